"""Blockwise prediction with a supervised StarDist model (checkpoint kind "stardist").

:func:`cellulus_scale.workflows.predict.predict` picks this method when its model is a StarDist
model. Stages, each a set of independent block tasks recorded for ``--resume`` like the OCE
method's:

1. ``candidates``: the network's object probability and ray lengths on the block grown by a
   halo H (one object diameter, rounded up to the pooling grid), read with the network's
   context (44 px per side on every axis for the depth-3 model, 40 for the depth-2 model on a
   grid of 2, whose output is every second pixel along each axis: StarDist's grid) and
   reflect padding at the frame border; every pixel of the grown block whose probability
   exceeds ``prob_threshold`` is a candidate polygon (polyhedron in 3D); non-maximum
   suppression (overlap above ``nms_threshold``) runs on them; the block keeps the surviving
   candidates whose centre pixel lies in its core (centre ownership, as for the OCE
   centres). Also writes the image copy.
2. The kept candidates of the video are sorted by (frame, position) and numbered 1..N.
3. ``labels``: each block draws, at global coordinates, every kept polygon of its frame that
   overlaps its grown region (less probable first, ties by ID); in 'nucleus' mode (the
   default) each polygon is then grown by d/4 and outlined by the threshold of its intensities,
   as Cellulus' objects are (:func:`outline_nuclei`); the block writes its core.

The network's read window starts on the same pooling phase for every block, so a pixel's
probability and distances do not depend on the block; suppression visits candidates in an
order fixed by probability and global position; rendering is a function of global
coordinates. Labels therefore agree between block sizes (up to suppression chains longer than
the halo, which are rare, and, in 'nucleus' mode, objects larger than the diameter, whose
outline can see the labels stage's halo: d and three times d/4). The same holds in 3D (blocks
in z, y and x; polyhedra on rays on a sphere, StarDist's 3D suppression and rendering).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
from skimage.segmentation import expand_labels

from cellulus_scale.blockwise.blocks import Block
from cellulus_scale.blockwise.engine import Session, Stage
from cellulus_scale.blockwise.plan import Plan
from cellulus_scale.blockwise.store import (
    FeatureImage,
    check_finite,
    labels_array,
    read_region,
    write_image_core,
    write_labels_core,
)
from cellulus_scale.errors import UserInputError
from cellulus_scale.kernels.inference import predict_probability
from cellulus_scale.kernels.star_convex import as_anisotropy, render_polygons, suppress
from cellulus_scale.methods.base import (
    Method,
    MethodResult,
    Statistics,
    WrittenObjects,
    load_model,
    network_window,
    postprocess_region,
)
from cellulus_scale.model.checkpoint import Checkpoint
from cellulus_scale.model.unet import axis_flat_levels, pooling_step


def suppression_halo(plan: Plan, step: int) -> tuple[int, int]:
    """(H, Hn): the candidates' halo (one diameter) and the network's output halo (H rounded
    up to the network's pooling ``step``, so that every block reads on the same phase)."""
    halo = plan.settings.segmentation.clustering_halo
    return halo, int(math.ceil(halo / step)) * step


def on_grid(
    output: np.ndarray, origin: Sequence[int], grid: int, region: Sequence[slice]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The part of ``output`` (C, *points; point i of an axis at pixel ``origin + grid * i``)
    whose points lie in ``region`` (pixels), and those points' pixel coordinates per axis."""
    window, coordinates = [slice(None)], []
    for o, r, n in zip(origin, region, output.shape[1:], strict=True):
        first = max(0, -(-(r.start - o) // grid))
        last = min(n, max(first, -(-(r.stop - o) // grid)))
        window.append(slice(first, last))
        coordinates.append(o + grid * np.arange(first, last))
    return output[tuple(window)], coordinates


def candidates_task(plan: Plan, frame: int, block: Block) -> dict[str, np.ndarray]:
    """Network on the grown block, candidates, suppression; keep the survivors this block owns."""
    model, checkpoint, device = load_model(plan)
    config = checkpoint.model_config
    depth, grid = config.depth, config.grid
    n_rays = config.outputs - 1
    flats = axis_flat_levels(config)  # an anisotropic 3D model leaves z alone in its first levels
    steps = [pooling_step(depth, flat, grid) for flat in flats]
    halo = plan.settings.segmentation.clustering_halo
    network_halos = [suppression_halo(plan, step)[1] for step in steps]
    contexts = plan.settings.halos(plan.spatial_dims)
    reads = [n + c for n, c in zip(network_halos, contexts, strict=True)]
    indices = network_window(plan, block, reads, depth, flats, grid)
    raw = read_region(plan, frame, indices)
    check_finite(raw, plan, frame)
    core_raw = raw[
        (slice(None),) + tuple(slice(r, r + s) for r, s in zip(reads, block.shape, strict=True))
    ]
    write_image_core(plan, frame, block, core_raw)
    seg = plan.settings.segmentation
    points = np.zeros((0, plan.spatial_dims), np.int64)
    probs = np.zeros(0, np.float32)
    dists = np.zeros((0, n_rays), np.float32)
    foreground = 0
    if raw.size and raw.max() > raw.min():
        output = predict_probability(
            model, checkpoint.normalisation.apply(raw), device, seg.precision
        )
        region = block.grown(halo, plan.spatial_shape)
        origin = [s - n for s, n in zip(block.start, network_halos, strict=True)]
        window, coordinates = on_grid(output, origin, grid, region)
        inside = zip(coordinates, block.start, block.shape, strict=True)
        core = np.ix_(*[(c >= s) & (c < s + n) for c, s, n in inside])
        foreground = int((window[0][core] > seg.prob_threshold).sum()) * grid**plan.spatial_dims
        where = np.nonzero(window[0] > seg.prob_threshold)
        candidates = np.stack([c[w] for c, w in zip(coordinates, where, strict=True)], axis=1)
        candidate_probs = window[0][where]
        candidate_dists = window[1:][(slice(None), *where)].T
        kept = suppress(
            candidates, candidate_probs, candidate_dists, seg.nms_threshold, config.ray_anisotropy
        )
        kept = kept[block.owns(candidates[kept], plan.spatial_shape, plan.block_size)]
        points = candidates[kept].astype(np.int64)
        probs = candidate_probs[kept].astype(np.float32)
        dists = np.ascontiguousarray(candidate_dists[kept], dtype=np.float32)
    return {
        "points": points,
        "probs": probs,
        "dists": dists,
        "foreground": np.array(foreground),
        "signal": np.array(bool(core_raw.size and core_raw.max() > core_raw.min())),
        "frame": np.array(frame),
    }


def number_candidates(
    plan: Plan, results: list[dict[str, np.ndarray]], n_rays: int
) -> tuple[list[dict[str, np.ndarray]], int]:
    """Per frame, the kept candidates sorted by position, with IDs 1..N over the whole video."""
    per_frame: list[list[dict[str, np.ndarray]]] = [[] for _ in range(plan.frames)]
    for r in results:
        per_frame[int(r["frame"])].append(r)
    frames, next_id = [], 1
    for parts in per_frame:
        points = np.concatenate(
            [p["points"].reshape(-1, plan.spatial_dims) for p in parts]
            or [np.zeros((0, plan.spatial_dims), np.int64)]
        )
        probs = np.concatenate([p["probs"] for p in parts] or [np.zeros(0, np.float32)])
        dists = np.concatenate(
            [p["dists"].reshape(-1, n_rays) for p in parts] or [np.zeros((0, n_rays), np.float32)]
        )
        order = np.lexsort(points.T[::-1]) if len(points) else np.zeros(0, np.int64)
        frames.append(
            {
                "points": points[order],
                "probs": probs[order],
                "dists": dists[order],
                "ids": np.arange(next_id, next_id + len(order), dtype=np.uint64),
            }
        )
        next_id += len(order)
    return frames, next_id - 1


def labels_task(
    plan: Plan, frame: int, block: Block, kept: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Draw the kept polygons that overlap the grown block; in 'nucleus' mode outline them
    as Cellulus' objects (:func:`outline_nuclei`); write the block's core."""
    target = labels_array(plan)
    seg = plan.settings.segmentation
    halo = plan.settings.segmentation.clustering_halo
    if seg.mode == "nucleus":  # an object of diameter d that touches the core, grown by d/4
        # on each side, its neighbours that compete for that ring and its own contrast ring
        halo += 3 * seg.contrast_ring
    region = block.grown(halo, plan.spatial_shape)
    labels = render_polygons(
        kept["points"],
        kept["dists"],
        kept["probs"],
        kept["ids"],
        region,
        target.dtype,
        as_anisotropy(kept["anisotropy"]),  # the model's rays
    )
    if seg.mode == "nucleus":
        labels = outline_nuclei(plan, frame, region, labels)
    core_labels = labels[block.inner(region)]
    write_labels_core(plan, target, frame, block, core_labels)
    return {"objects": np.unique(core_labels[core_labels > 0])}


def outline_nuclei(
    plan: Plan, frame: int, region: Sequence[slice], labels: np.ndarray
) -> np.ndarray:
    """'nucleus' mode for polygons: grow each by the contrast ring (d/4, without overlap), so
    that it holds its nucleus' rim and some background, then post-process as Cellulus' objects
    (the threshold of each object's intensities, the minimum size and the contrast rule).

    A star-convex polygon of few rays, regressed from the pixel, falls inside the nucleus (on
    BBBC039, student polygons matched SEG 0.756 where their teacher's thresholded masks had
    0.832); the threshold outlines it to the pixel again (README, "Supervised refinement")."""
    seg = plan.settings.segmentation
    spacing = 1.0 if plan.settings.voxel_size is None else plan.settings.voxel_size
    grown = expand_labels(labels, seg.contrast_ring, spacing=spacing)
    return postprocess_region(plan, frame, region, grown)


def run(session: Session, checkpoint: Checkpoint | None) -> MethodResult:
    """Candidates on the GPU workers (if any), numbered over the video, then drawn."""
    assert checkpoint is not None
    plan = session.plan
    n_rays = checkpoint.model_config.outputs - 1
    with session.timed("network"):
        found = session.run(Stage("candidates", candidates_task, gpu=True))
        signal = [False] * plan.frames
        for r in found:
            signal[int(r["frame"])] |= bool(r["signal"])
        pixels = plan.frames * math.prod(plan.spatial_shape)
        stats = Statistics(
            threshold=plan.settings.segmentation.prob_threshold,
            mean_offset=(0.0,) * plan.spatial_dims,
            frames_with_signal=tuple(signal),
            foreground_fraction=float(sum(int(r["foreground"]) for r in found) / pixels),
        )
        session.record(statistics=asdict(stats))
        kept, objects = number_candidates(plan, found, n_rays)
        anisotropy = np.asarray(checkpoint.model_config.ray_anisotropy or (), np.float64)
        for frame_kept in kept:
            frame_kept["anisotropy"] = anisotropy

    with session.timed("labels"):
        labels = Stage("labels", labels_task)
        session.prepare_labels(objects, written_by=labels)
        scattered = session.scatter([[kept[f]] for f in range(plan.frames)])
        written = WrittenObjects()
        session.run(labels, per_frame=scattered, collect=written.add)
    return MethodResult(written.count, stats)


def features(plan: Plan, save_embeddings: bool) -> Sequence[FeatureImage]:
    """None: a StarDist model has no embeddings to keep."""
    if save_embeddings:
        raise UserInputError(
            "--save-embeddings is for OCE models; a StarDist model has no embeddings",
            "drop --save-embeddings",
        )
    return ()


METHOD = Method("stardist", run, features, network=True)
