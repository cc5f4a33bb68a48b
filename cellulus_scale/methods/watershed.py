"""The classical baseline (``--method watershed``): a global Otsu threshold of the intensity and
a distance-transform watershed, on the same blocks as Cellulus.

Stages:

1. ``range``: the intensity range of each block (not recorded: a cheap pass);
2. ``oce`` (shown as "intensity"): copy the image block, histogram its intensity over the
   video's range;
3. statistics, once per video: the Otsu threshold of the pooled histogram;
4. ``centres``: seed markers on the block grown by one diameter; the block keeps those it owns;
5. ``labels``: the watershed from every marker near the grown block, numbered over the video.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellulus_scale.blockwise.blocks import Block
from cellulus_scale.blockwise.engine import Session, Stage
from cellulus_scale.blockwise.plan import Plan
from cellulus_scale.blockwise.store import (
    FeatureImage,
    check_finite,
    read_region,
    write_image_core,
)
from cellulus_scale.kernels.watershed import (
    marker_positions,
    watershed_from_markers,
    watershed_markers,
)
from cellulus_scale.methods.base import Method, MethodResult, Statistics, embeddings_image
from cellulus_scale.methods.centres import (
    INTENSITY_BINS,
    HistogramTotals,
    centres_and_labels,
)
from cellulus_scale.model.checkpoint import Checkpoint


def _intensity(plan: Plan, frame: int, region: Sequence[slice]) -> np.ndarray:
    """Raw intensity of a frame region, averaged over channels, as float32."""
    indices = [np.arange(r.start, r.stop) for r in region]
    raw = read_region(plan, frame, indices)
    check_finite(raw, plan, frame)
    return raw.astype(np.float32).mean(axis=0)


def range_task(plan: Plan, frame: int, block: Block) -> dict[str, np.ndarray]:
    """Watershed baseline, pass 1: intensity range of one block."""
    values = _intensity(plan, frame, block.core)
    return {"low": np.array(values.min()), "high": np.array(values.max())}


def intensity_task(
    plan: Plan, frame: int, block: Block, low: float, high: float
) -> dict[str, np.ndarray]:
    """Watershed baseline, pass 2: copy the image block, histogram its intensity."""
    indices = [np.arange(r.start, r.stop) for r in block.core]
    raw = read_region(plan, frame, indices)
    check_finite(raw, plan, frame)
    write_image_core(plan, frame, block, raw)
    values = raw.astype(np.float32).mean(axis=0)
    counts, _ = np.histogram(values, bins=INTENSITY_BINS, range=(low, max(high, low + 1e-6)))
    occupied = np.flatnonzero(counts)
    return {
        "bins": occupied,
        "counts": counts[occupied].astype(np.int64),
        "signal": np.array(bool(values.size and values.max() > values.min())),
        "frame": np.array(frame),
        "low": np.array(low),
        "high": np.array(high),
    }


def _watershed_inputs(plan: Plan, stats: Statistics, frame: int, block: Block):
    seg = plan.settings.segmentation
    region = block.grown(seg.clustering_halo, plan.spatial_shape)
    values = _intensity(plan, frame, region)
    markers, count, distance, foreground = watershed_markers(
        values, stats.threshold, seg.diameter, plan.settings.voxel_size
    )
    return region, markers, count, distance, foreground


def centres_task(plan: Plan, frame: int, block: Block, stats: Statistics) -> dict[str, np.ndarray]:
    """Seed markers on the grown block; keep one position per marker this block owns."""
    centres = np.zeros((0, plan.spatial_dims))
    if stats.frames_with_signal[frame]:
        region, markers, count, _, _ = _watershed_inputs(plan, stats, frame, block)
        centres = marker_positions(markers, count) + np.array([r.start for r in region])
        owned = block.owns(centres, plan.spatial_shape, plan.block_size)
        centres = centres[owned].astype(float)
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
    """Flood the grown block from markers at the numbered centres; the block's core."""
    region, _, _, distance, foreground = _watershed_inputs(plan, stats, frame, block)
    origin = np.array([r.start for r in region])
    local = np.round(centres).astype(np.int64) - origin
    inside = np.all((local >= 0) & (local < np.array(foreground.shape)), axis=1)
    markers = np.zeros(foreground.shape, dtype=np.int64)
    markers[tuple(local[inside].T)] = ids[inside].astype(np.int64)
    diameter = plan.settings.segmentation.diameter
    labels = watershed_from_markers(
        distance, foreground, markers, diameter, plan.settings.voxel_size
    )
    return labels[block.inner(region)].astype(dtype)


def run(session: Session, checkpoint: Checkpoint | None) -> MethodResult:
    """The video's intensity range, the histogram, then statistics, centres and labels."""
    totals = HistogramTotals(session.plan)
    with session.timed("network"):
        ranges = session.run(Stage("range", range_task, recorded=False))
        low = min(float(r["low"]) for r in ranges)
        high = max(float(r["high"]) for r in ranges)
        intensity = Stage("oce", intensity_task, label="intensity")
        session.run(intensity, shared=(low, high), collect=totals.add)
    return centres_and_labels(session, totals, centres_task, label_block)


def features(plan: Plan, save_embeddings: bool) -> Sequence[FeatureImage]:
    """As in the first release: the baseline has no embeddings, but keeps an empty embeddings
    image with ``--save-embeddings``."""
    return (embeddings_image(plan, keep=save_embeddings),)


METHOD = Method("watershed", run, features, network=False)
