"""Cellulus: segmentation by object-centric embeddings (OCEs) of a self-supervised model
(checkpoint kind "oce").

Stages, each a set of independent block tasks whose results the engine records, so that
``--resume`` redoes only what is missing:

1. ``oce``: OCE offsets and their std for each block, read with a halo equal to the network's
   context (reflect padding at the frame border), test-time noise a function of the global
   pixel position; writes them in compact form (:mod:`cellulus_scale.kernels.compact`, a
   scratch array of the run; as float32 too with ``--save-embeddings``) and a copy of the
   image, returns a histogram of the std with per-bin offset sums.
2. statistics, once per video: Otsu threshold of the std and the mean foreground offset.
3. ``centres``: mean-shift on the centred foreground embeddings of the block grown by one
   diameter (physical: fewer planes in z on anisotropic voxels); the block keeps the centres
   that fall in its core (centre ownership).
4. ``labels``: every pixel of the grown block takes the ID of its nearest centre (IDs numbered
   over the whole video), post-processing runs on the grown block, the core is written.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from cellulus_scale.blockwise.blocks import Block, halo_in_voxels
from cellulus_scale.blockwise.engine import Session, Stage
from cellulus_scale.blockwise.plan import Plan
from cellulus_scale.blockwise.store import (
    FeatureImage,
    check_finite,
    read_feature,
    read_region,
    write_feature_core,
    write_image_core,
)
from cellulus_scale.kernels import compact
from cellulus_scale.kernels.clustering import (
    assign_to_centres,
    embeddings_of,
    find_centres,
    fit_sample_mask,
)
from cellulus_scale.kernels.oce import passes_per_batch, predict_oce_block
from cellulus_scale.methods.base import (
    EMBEDDINGS_NAME,
    Method,
    MethodResult,
    Statistics,
    embeddings_image,
    load_model,
    network_window,
    postprocess_region,
)
from cellulus_scale.methods.centres import (
    HIST_EDGES,
    HistogramTotals,
    centres_and_labels,
)
from cellulus_scale.model.checkpoint import Checkpoint
from cellulus_scale.model.unet import axis_flat_levels

#: The compact OCEs kept between the stages: a scratch array in the run's work folder.
COMPACT_NAME = "compact-oces"
#: Delta coding along x before compression: 0.77 of the offsets' bytes on real nuclei.
COMPACT_FILTERS = ({"id": "delta", "dtype": "u1"},)


def oce_task(plan: Plan, frame: int, block: Block, full: bool) -> dict[str, np.ndarray]:
    """Predict OCEs of one block, write them in compact form (and as float32 if ``full``) and
    the image copy, return its std histogram."""
    model, checkpoint, device = load_model(plan)
    halos = plan.settings.halos(plan.spatial_dims)
    config = checkpoint.model_config
    indices = network_window(plan, block, halos, config.depth, axis_flat_levels(config))
    raw = read_region(plan, frame, indices)
    check_finite(raw, plan, frame)
    image = checkpoint.normalisation.apply(raw)
    grids = [
        i.reshape([-1 if a == axis else 1 for a in range(len(indices))])
        for axis, i in enumerate(indices)
    ]
    seg = plan.settings.segmentation
    offsets, std = predict_oce_block(
        model,
        image,
        grids,
        frame,
        seg.tta_passes,
        seg.noise_fraction,
        seg.noise_values,
        seg.seed,
        device,
        batch_size=passes_per_batch(seg.tta_passes, image[0].size, device.type),
        precision=seg.precision,
    )
    crop = tuple(slice(0, s) for s in block.shape)
    offsets, std = offsets[(slice(None), *crop)], std[crop]
    core_raw = raw[
        (slice(None),) + tuple(slice(h, h + s) for h, s in zip(halos, block.shape, strict=True))
    ]
    kept = compact.encode(
        offsets, std, seg.offset_step, HIST_EDGES, seg.std_bins_per_code, seg.threshold
    )
    write_feature_core(plan, compact_path(plan), frame, block, kept)
    if full:
        embeddings = np.concatenate([offsets, std[None]]).astype(np.float32)
        write_feature_core(plan, EMBEDDINGS_NAME, frame, block, embeddings)
    write_image_core(plan, frame, block, core_raw)
    bins = np.clip(
        np.searchsorted(HIST_EDGES, std.ravel(), side="right") - 1, 0, len(HIST_EDGES) - 2
    )
    counts = np.bincount(bins, minlength=len(HIST_EDGES) - 1)
    sums = np.stack(
        [np.bincount(bins, weights=o.ravel(), minlength=len(HIST_EDGES) - 1) for o in offsets]
    )
    occupied = np.flatnonzero(counts)  # stored sparse: a block's std spans few bins
    return {
        "bins": occupied,
        "counts": counts[occupied].astype(np.int64),
        "offset_sums": sums[:, occupied],
        "signal": np.array(bool(core_raw.size and core_raw.max() > core_raw.min())),
        "frame": np.array(frame),
    }


def _grown_embeddings(
    plan: Plan, stats: Statistics, frame: int, block: Block, halo: int
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    region = block.grown(halo_in_voxels(halo, plan.settings.spacing), plan.spatial_shape)
    seg = plan.settings.segmentation
    offsets, foreground = compact.decode(
        read_feature(plan, compact_path(plan), frame, region),
        seg.offset_step,
        code_limit(plan, stats),
    )
    origin = [r.start for r in region]
    embeddings = embeddings_of(
        offsets, origin, np.asarray(stats.mean_offset), plan.settings.spacing
    )
    return region, embeddings, foreground


def compact_path(plan: Plan) -> str:
    """The compact OCEs' path in the output: in the run's work folder."""
    return f"{plan.work_dir}/{COMPACT_NAME}"


def code_limit(plan: Plan, stats: Statistics) -> int:
    """The std codes below which a pixel is foreground: those of the bins below the Otsu
    threshold (on a multiple of ``std_bins_per_code`` bins), or 0 alone for a given one."""
    seg = plan.settings.segmentation
    if seg.threshold is not None:
        return 1
    edge = int(np.searchsorted(HIST_EDGES, stats.threshold))
    return edge // seg.std_bins_per_code


def centres_task(plan: Plan, frame: int, block: Block, stats: Statistics) -> dict[str, np.ndarray]:
    """Mean-shift on the grown block; keep the centres whose owner is this block."""
    seg = plan.settings.segmentation
    spacing = plan.settings.spacing  # centres are in in-plane pixels; ownership by voxel
    centres = np.zeros((0, plan.spatial_dims))
    if stats.frames_with_signal[frame]:
        region, embeddings, foreground = _grown_embeddings(
            plan, stats, frame, block, seg.clustering_halo
        )
        sample = fit_sample_mask(
            foreground.shape, [r.start for r in region], frame, seg.seed, seg.fit_fraction
        )
        centres = find_centres(embeddings, foreground, sample, seg.bandwidth, seg.clustering)
        if len(centres):
            voxels = centres if spacing is None else centres / np.asarray(spacing)
            centres = centres[block.owns(voxels, plan.spatial_shape, plan.block_size)]
    return {"centres": centres, "frame": np.array(frame)}


def label_block(
    plan: Plan,
    frame: int,
    block: Block,
    stats: Statistics,
    centres: np.ndarray,
    ids: np.ndarray,
    dtype: np.dtype,
    clock: dict[str, float],
) -> np.ndarray:
    """Assign every foreground pixel of the grown block the ID of its nearest centre,
    post-process there; the block's core of the labels."""
    seg = plan.settings.segmentation
    region, embeddings, foreground = _grown_embeddings(
        plan, stats, frame, block, seg.labelling_halo
    )
    reach = seg.assign_distance + seg.labelling_halo
    spacing = plan.settings.spacing
    scale = np.ones(plan.spatial_dims) if spacing is None else np.asarray(spacing)
    low = np.array([r.start for r in region]) * scale - reach
    high = np.array([r.stop for r in region]) * scale + reach
    near = np.all((centres >= low) & (centres <= high), axis=1)
    labels = assign_to_centres(
        embeddings, foreground, centres[near], ids[near], seg.assign_distance, dtype
    )
    clock["stitching"] = time.perf_counter()
    labels = postprocess_region(plan, frame, region, labels)
    core_labels = labels[block.inner(region)]
    clock["post-processing"] = time.perf_counter()
    return core_labels


def run(session: Session, checkpoint: Checkpoint | None) -> MethodResult:
    """OCEs on the GPU workers (if any), then statistics, centres and labels."""
    totals = HistogramTotals(session.plan, session.plan.settings.segmentation.std_bins_per_code)
    full = any(f.name == EMBEDDINGS_NAME for f in session.features)
    with session.timed("network"):
        stage = Stage("oce", oce_task, label="OCEs", gpu=True)
        session.run(stage, shared=(full,), collect=totals.add)
    return centres_and_labels(session, totals, centres_task, label_block)


def features(plan: Plan, save_embeddings: bool) -> Sequence[FeatureImage]:
    """The compact OCEs the stages share, and with ``save_embeddings`` the float32 ones, kept."""
    kept = FeatureImage(compact_path(plan), plan.spatial_dims + 1, False, "uint8", COMPACT_FILTERS)
    return (kept, embeddings_image(plan, keep=True)) if save_embeddings else (kept,)


METHOD = Method("cellulus", run, features, network=True)
