"""Blockwise prediction with a supervised StarDist model (checkpoint kind "stardist").

:func:`cellulus_scale.predict.predict` hands a run here when its model is a StarDist model.
Stages, each a set of independent block tasks recorded for ``--resume`` like the OCE path's:

1. ``candidates``: the network's object probability and ray lengths on the block grown by a
   halo H (one object diameter, rounded up to the pooling grid), read with the network's
   context (``model.context(3)`` = 44 px per side on every axis for the depth-3 model) and
   reflect padding at the frame border; every pixel of the grown block whose probability
   exceeds ``prob_threshold`` is a candidate polygon (polyhedron in 3D); non-maximum
   suppression (overlap above ``nms_threshold``) runs on them; the block keeps the surviving
   candidates whose centre pixel lies in its core (centre ownership, as for the OCE
   centres). Also writes the image copy.
2. The kept candidates of the video are sorted by (frame, position) and numbered 1..N.
3. ``labels``: each block draws, at global coordinates, every kept polygon of its frame that
   overlaps its grown region (less probable first, ties by ID) and writes its core.

The network's read window starts on the same pooling phase for every block, so a pixel's
probability and distances do not depend on the block; suppression visits candidates in an
order fixed by probability and global position; rendering is a function of global
coordinates. Labels therefore agree between block sizes (up to suppression chains longer than
the halo, which are rare). The same holds in 3D (blocks in z, y and x; polyhedra on rays on a
sphere, StarDist's 3D suppression and rendering).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cellulus_scale.blockwise.blocks import Block, owner_index
from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr as ome_io
from cellulus_scale.kernels.inference import predict_probability
from cellulus_scale.kernels.noise import reflect_indices
from cellulus_scale.kernels.star_convex import render_polygons, suppress
from cellulus_scale.model.checkpoint import Checkpoint
from cellulus_scale.model.unet import smallest_valid_size_at_least
from cellulus_scale.predict import (
    LABELS_NAME,
    Plan,
    PredictResult,
    Statistics,
    _array,
    _check_finite,
    _count_done,
    _frame_region,
    _load_marker,
    _load_model,
    _marker,
    _output_index,
    _run_stage,
    _save_marker,
    _squeeze_like,
    finish_output,
    prepare_labels,
    run_session,
)


def suppression_halo(plan: Plan, depth: int) -> tuple[int, int]:
    """(H, Hn): the candidates' halo (one diameter) and the network's output halo (H rounded
    up to the depth-``depth`` pooling grid, so that every block reads on the same phase)."""
    halo = plan.segmentation.clustering_halo
    step = 2**depth
    return halo, int(math.ceil(halo / step)) * step


def candidates_task(plan: Plan, frame: int, block: Block) -> dict[str, np.ndarray]:
    """Network on the grown block, candidates, suppression; keep the survivors this block owns."""
    marker = _marker(plan, "candidates", frame, block)
    done = _load_marker(marker)
    if done is not None:
        return done
    model, checkpoint, device = _load_model(plan)
    depth = checkpoint.model_config.depth
    n_rays = checkpoint.model_config.outputs - 1
    halo, network_halo = suppression_halo(plan, depth)
    context = plan.network_context
    indices = []
    for start, size, length in zip(block.start, block.shape, plan.spatial_shape, strict=True):
        read = smallest_valid_size_at_least(size + 2 * (network_halo + context), depth)
        first = start - network_halo - context
        indices.append(reflect_indices(first, first + read, length))
    raw = _frame_region(plan, frame, indices)
    _check_finite(raw, plan, frame)
    core_raw = raw[
        (slice(None),)
        + tuple(slice(context + network_halo, context + network_halo + s) for s in block.shape)
    ]
    copy = _array(plan.output_path, "0")
    copy[_output_index(plan, frame, block.core, slice(None))] = _squeeze_like(
        plan, core_raw.astype(copy.dtype)
    )
    seg = plan.segmentation
    points = np.zeros((0, plan.spatial_dims), np.int64)
    probs = np.zeros(0, np.float32)
    dists = np.zeros((0, n_rays), np.float32)
    foreground = 0
    if raw.size and raw.max() > raw.min():
        output = predict_probability(
            model, checkpoint.normalisation.apply(raw), device, seg.precision
        )
        region = block.grown(halo, plan.spatial_shape)
        local = tuple(
            slice(r.start - (s - network_halo), r.stop - (s - network_halo))
            for r, s in zip(region, block.start, strict=True)
        )
        window = output[(slice(None), *local)]
        inner = tuple(
            slice(a - r.start, b - r.start)
            for a, b, r in zip(block.start, block.stop, region, strict=True)
        )
        foreground = int((window[0][inner] > seg.prob_threshold).sum())
        where = np.nonzero(window[0] > seg.prob_threshold)
        candidates = np.stack(where, axis=1) + np.array([r.start for r in region])
        candidate_probs = window[0][where]
        candidate_dists = window[1:][(slice(None), *where)].T
        kept = suppress(candidates, candidate_probs, candidate_dists, seg.nms_threshold)
        owners = owner_index(candidates[kept], plan.spatial_shape, plan.block_size)
        kept = kept[np.all(owners == np.asarray(block.index), axis=1)]
        points = candidates[kept].astype(np.int64)
        probs = candidate_probs[kept].astype(np.float32)
        dists = np.ascontiguousarray(candidate_dists[kept], dtype=np.float32)
    result = {
        "points": points,
        "probs": probs,
        "dists": dists,
        "foreground": np.array(foreground),
        "signal": np.array(bool(core_raw.size and core_raw.max() > core_raw.min())),
        "frame": np.array(frame),
    }
    _save_marker(marker, **result)
    return result


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
    plan: Plan, depth: int, frame: int, block: Block, kept: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Draw the kept polygons that overlap the grown block; write the block's core."""
    marker = _marker(plan, "labels", frame, block)
    done = _load_marker(marker)
    if done is not None:
        return done
    target = _array(plan.output_path, f"labels/{LABELS_NAME}/0")
    region = block.grown(suppression_halo(plan, depth)[0], plan.spatial_shape)
    labels = render_polygons(
        kept["points"], kept["dists"], kept["probs"], kept["ids"], region, target.dtype
    )
    inner = tuple(
        slice(a - r.start, b - r.start)
        for a, b, r in zip(block.start, block.stop, region, strict=True)
    )
    core_labels = labels[inner]
    target[_output_index(plan, frame, block.core, slice(0, 1))] = _squeeze_like(
        plan, core_labels[None]
    )
    result = {"objects": np.unique(core_labels[core_labels > 0])}
    _save_marker(marker, **result)
    return result


def predict_stardist(
    plan: Plan,
    image: ome_io.OmeImage,
    checkpoint: Checkpoint,
    scheduler: str | None,
    workers: int | None,
    client: Any,
    overwrite: bool,
    resume: bool,
    save_embeddings: bool,
    progress: bool,
) -> PredictResult:
    """Run the StarDist stages of ``plan`` (``checkpoint``: its model, of kind "stardist") on
    Dask; write labels/cellulus; mark the output complete."""
    from cellulus_scale.blockwise.cluster import network_resources

    if save_embeddings:
        raise UserInputError(
            "--save-embeddings is for OCE models; a StarDist model has no embeddings",
            "drop --save-embeddings",
        )
    depth, n_rays = checkpoint.model_config.depth, checkpoint.model_config.outputs - 1
    timings: dict[str, float] = {}
    recomputed: dict[str, int] = {}
    work = [(frame, block) for frame in range(plan.frames) for block in plan.blocks]
    with run_session(plan, image, client, scheduler, workers, overwrite, resume, progress) as (
        dask,
        plan,
        root,
    ):
        start = time.perf_counter()
        recomputed["candidates"] = len(work) - _count_done(plan, "candidates", work)
        gpu = network_resources(dask, plan.device)  # GPU workers, if any, run the network
        arguments = [(plan, f, b) for f, b in work]
        found = _run_stage(dask, "candidates", candidates_task, arguments, progress, resources=gpu)
        signal = [False] * plan.frames
        for r in found:
            signal[int(r["frame"])] |= bool(r["signal"])
        pixels = plan.frames * math.prod(plan.spatial_shape)
        stats = Statistics(
            threshold=plan.segmentation.prob_threshold,
            mean_offset=(0.0,) * plan.spatial_dims,
            frames_with_signal=tuple(signal),
            foreground_fraction=float(sum(int(r["foreground"]) for r in found) / pixels),
        )
        ome_io.mark_status(root, "incomplete", statistics=asdict(stats))
        kept, objects = number_candidates(plan, found, n_rays)
        timings["network"] = time.perf_counter() - start

        start = time.perf_counter()
        prepare_labels(plan, image, root, objects)
        recomputed["labels"] = len(work) - _count_done(plan, "labels", work)
        scattered = [dask.scatter([kept[f]], broadcast=False)[0] for f in range(plan.frames)]
        _run_stage(
            dask,
            "labels",
            labels_task,
            [(plan, depth, f, b, scattered[f]) for f, b in work],
            progress,
        )
        timings["labels"] = time.perf_counter() - start

    start = time.perf_counter()
    finish_output(plan, image, root, False, stats, objects)
    timings["writing"] = time.perf_counter() - start
    return PredictResult(Path(plan.output_path), objects, stats, len(work), recomputed, timings)
