"""What the centre-based methods (OCE, watershed) share after their first stage: the
whole-video statistics reduced from its block histograms, the ``centres`` stage (each block
keeps the centres it owns), the centres numbered over the video, and the ``labels`` stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np

from cellulus_scale.blockwise.blocks import Block
from cellulus_scale.blockwise.engine import Process, Session, Stage
from cellulus_scale.blockwise.plan import Plan
from cellulus_scale.blockwise.store import labels_array, write_labels_core
from cellulus_scale.kernels.compact import CODE_MAX
from cellulus_scale.methods.base import MethodResult, Statistics, WrittenObjects

HIST_EDGES = np.concatenate([[0.0], np.logspace(-6, 3, 4096)])
INTENSITY_BINS = 4096


class HistogramTotals:
    """The block histograms of the first stage, summed as blocks finish (O(bins) memory). An
    Otsu threshold of the std falls on a multiple of ``bins_per_code`` bins (the resolution of
    the std kept between stages, :mod:`cellulus_scale.kernels.compact`)."""

    def __init__(self, plan: Plan, bins_per_code: int = 1) -> None:
        self.bins_per_code = bins_per_code
        bins = INTENSITY_BINS if plan.method == "watershed" else len(HIST_EDGES) - 1
        self.counts = np.zeros(bins, dtype=np.int64)
        self.sums = np.zeros((plan.spatial_dims, bins))
        self.signal = [False] * plan.frames
        self.low = self.high = 0.0

    def add(self, result: dict[str, np.ndarray]) -> None:
        bins = result["bins"]
        self.counts[bins] += result["counts"]
        if "offset_sums" in result:
            self.sums[:, bins] += result["offset_sums"]
        else:
            self.low, self.high = float(result["low"]), float(result["high"])
        self.signal[int(result["frame"])] |= bool(result["signal"])


def compute_statistics(plan: Plan, totals: HistogramTotals) -> Statistics:
    """Otsu threshold on the pooled std histogram (of the std or of its logarithm) and the mean
    foreground offset (per video)."""
    from skimage.filters import threshold_otsu

    counts, signal = totals.counts, totals.signal
    if plan.method == "watershed":
        from cellulus_scale.kernels.watershed import otsu_from_histogram

        low, high = totals.low, totals.high
        edges = np.linspace(low, max(high, low + 1e-6), INTENSITY_BINS + 1)
        threshold = (
            float(plan.settings.segmentation.threshold)
            if plan.settings.segmentation.threshold is not None
            else otsu_from_histogram(counts, edges)
        )
        fraction = float(counts[edges[1:] > threshold].sum() / max(1, counts.sum()))
        return Statistics(threshold, (0.0,) * plan.spatial_dims, tuple(signal), fraction)
    sums = totals.sums
    centres = 0.5 * (HIST_EDGES[:-1] + HIST_EDGES[1:])
    if plan.settings.segmentation.threshold is not None:
        threshold = float(plan.settings.segmentation.threshold)
        last = int(np.searchsorted(centres, threshold, side="left")) - 1
    else:
        occupied = np.flatnonzero(counts)
        lo, hi = occupied[0], occupied[-1] + 1
        if hi - lo < 2:
            last = hi - 1
        else:
            values = centres[lo:hi]
            if plan.settings.segmentation.std_threshold_for(plan.spatial_dims) == "log-otsu":
                values = np.log(values)
            otsu = threshold_otsu(hist=(counts[lo:hi], values))
            last = lo + int(np.searchsorted(values, otsu, side="left"))
        last = snapped_edge(last + 1, totals.bins_per_code) - 1
        threshold = float(HIST_EDGES[last + 1])
    foreground = counts[: last + 1].sum()
    if foreground:
        mean_offset = tuple(float(v) for v in sums[:, : last + 1].sum(axis=1) / foreground)
    else:
        mean_offset = (0.0,) * plan.spatial_dims
    return Statistics(threshold, mean_offset, tuple(signal), float(foreground / counts.sum()))


def snapped_edge(edge: int, bins_per_code: int) -> int:
    """The histogram edge nearest ``edge`` on a multiple of ``bins_per_code`` (at least one such
    step above 0 where ``edge`` is, at most :data:`CODE_MAX` of them)."""
    if bins_per_code == 1:
        return edge
    steps = int(np.floor(edge / bins_per_code + 0.5))
    return min(max(steps, 1 if edge > 0 else 0), CODE_MAX) * bins_per_code


def number_centres(
    plan: Plan, results: Sequence[dict[str, np.ndarray]]
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Sort each frame's centres by position and number them 1..N over the whole video."""
    per_frame: list[list[np.ndarray]] = [[] for _ in range(plan.frames)]
    for r in results:
        per_frame[int(r["frame"])].append(r["centres"])
    centres, ids, next_id = [], [], 1
    for frame_parts in per_frame:
        stacked = np.concatenate(frame_parts) if frame_parts else np.zeros((0, plan.spatial_dims))
        stacked = stacked[np.lexsort(stacked.T[::-1])] if len(stacked) else stacked
        centres.append(stacked)
        ids.append(np.arange(next_id, next_id + len(stacked), dtype=np.uint64))
        next_id += len(stacked)
    return centres, ids, next_id - 1


#: A method's labels of one block: (plan, frame, block, stats, centres, ids, dtype, clock) ->
#: the labels of the block's core, for a frame with signal and centres; ``clock`` records when
#: each part ended (e.g. ``clock["stitching"] = time.perf_counter()``).
LabelBlock = Callable[..., np.ndarray]


def centres_and_labels(
    session: Session, totals: HistogramTotals, centres_task: Process, label_block: LabelBlock
) -> MethodResult:
    """Statistics from the first stage's ``totals``; then the ``centres`` stage
    (``centres_task(plan, frame, block, stats)`` returns the centres the block owns), the
    centres numbered over the video, and the ``labels`` stage (:func:`labels_task` with the
    method's ``label_block``)."""
    plan = session.plan
    with session.timed("statistics"):
        stats = compute_statistics(plan, totals)
        session.record(statistics=asdict(stats))

    with session.timed("clustering"):
        found = session.run(Stage("centres", centres_task, label="clustering"), shared=(stats,))
        centres, ids, objects = number_centres(plan, found)

    start = time.perf_counter()
    labels = Stage("labels", labels_task)
    session.prepare_labels(objects, written_by=labels)
    parts: dict[str, float] = {}
    written = WrittenObjects()

    def collect(result: dict[str, np.ndarray]) -> None:
        written.add(result)
        for part, seconds in zip(result["parts"], result["seconds"], strict=True):
            parts[part] = parts.get(part, 0.0) + float(seconds)

    scattered = session.scatter([[centres[f], ids[f]] for f in range(plan.frames)])
    session.run(labels, shared=(stats, label_block), per_frame=scattered, collect=collect)
    wall = time.perf_counter() - start
    busy = sum(parts.values()) or 1.0
    for part, seconds in parts.items():  # the stage's wall time, split by task-time share
        key = "writing labels" if part == "writing" else str(part)
        session.timings[key] = wall * seconds / busy
    return MethodResult(written.count, stats)


def labels_task(
    plan: Plan,
    frame: int,
    block: Block,
    stats: Statistics,
    label_block: LabelBlock,
    centres: np.ndarray,
    ids: np.ndarray,
) -> dict[str, np.ndarray]:
    """Label the block (none where the frame has no signal or no centres) and write its core;
    return the objects it holds and the seconds of each part."""
    clock = {"start": time.perf_counter()}  # when each part ended, for the benchmark
    target = labels_array(plan)
    core_labels = np.zeros(block.shape, dtype=target.dtype)
    if stats.frames_with_signal[frame] and len(centres):
        core_labels = label_block(plan, frame, block, stats, centres, ids, target.dtype, clock)
    write_labels_core(plan, target, frame, block, core_labels)
    clock["writing"] = time.perf_counter()
    moments = list(clock.values())
    return {
        "objects": np.unique(core_labels[core_labels > 0]),
        "seconds": np.array([b - a for a, b in zip(moments, moments[1:], strict=False)]),
        "parts": np.array(list(clock)[1:]),
    }
