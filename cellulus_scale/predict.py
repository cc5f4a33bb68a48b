"""Blockwise prediction on Dask (``cellulus-scale predict``).

Stages, each a set of independent block tasks whose results are recorded so that ``--resume``
redoes only what is missing:

1. ``oce``: OCE offsets and their std for each block, read with a halo equal to the network's
   context (reflect padding at the frame border), test-time noise a function of the global
   pixel position; writes the embeddings and a copy of the image, returns a histogram of the
   std with per-bin offset sums.
2. statistics, once per video: Otsu threshold of the std and the mean foreground offset.
3. ``centres``: mean-shift on the centred foreground embeddings of the block grown by one
   diameter; the block keeps the centres that fall in its core (centre ownership).
4. ``labels``: every pixel of the grown block takes the ID of its nearest centre (IDs numbered
   over the whole video), post-processing runs on the grown block, the core is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cellulus_scale.blockwise.blocks import Block, block_grid, owner_index
from cellulus_scale.config import SegmentationConfig, default_of
from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr as ome_io
from cellulus_scale.kernels.clustering import (
    assign_to_centres,
    embeddings_of,
    find_centres,
    fit_sample_mask,
    postprocess,
)
from cellulus_scale.kernels.noise import reflect_indices
from cellulus_scale.kernels.oce import passes_per_batch, predict_oce_block
from cellulus_scale.model.checkpoint import Checkpoint, check_compatible, load_checkpoint
from cellulus_scale.model.unet import context, smallest_valid_size_at_least

LABELS_NAME = "cellulus"
EMBEDDINGS_NAME = "embeddings"
WORK_DIR = ".cellulus-scale"
HIST_EDGES = np.concatenate([[0.0], np.logspace(-6, 3, 4096)])
INTENSITY_BINS = 4096


# --- the plan: everything a task needs, small and picklable -------------------------------


@dataclass(frozen=True)
class Plan:
    """A prediction run: input, output, model, blocks and settings."""

    input_path: str
    input_axes: str
    output_path: str
    model_path: str
    segmentation: SegmentationConfig
    block_size: tuple[int, ...]
    frames: int
    channels: int
    spatial_shape: tuple[int, ...]
    network_context: int
    device: str
    torch_threads: dict[str, int] = field(default_factory=dict)
    method: str = "cellulus"

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)

    @property
    def blocks(self) -> list[Block]:
        return block_grid(self.spatial_shape, self.block_size)

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["segmentation"] = asdict(self.segmentation)
        values.pop("torch_threads")
        return values


@dataclass(frozen=True)
class Statistics:
    """Whole-video statistics, computed once before any clustering."""

    threshold: float
    mean_offset: tuple[float, ...]
    frames_with_signal: tuple[bool, ...]
    foreground_fraction: float


@dataclass(frozen=True)
class PredictResult:
    """What a prediction run did."""

    output: Path
    objects: int
    statistics: Statistics
    blocks: int
    recomputed: dict[str, int]
    seconds: dict[str, float]


# --- per-process caches (one model per worker, not per block) ------------------------------

_CACHE: dict[Any, Any] = {}


def _cached(key: Any, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _torch_device(requested: str) -> Any:
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _load_model(plan: Plan) -> tuple[Any, Checkpoint, Any]:
    import torch

    def make() -> tuple[Any, Checkpoint, Any]:
        host_threads = plan.torch_threads.get(_worker_host(), 0)
        if host_threads:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // host_threads))
        device = _torch_device(plan.device)
        checkpoint = load_checkpoint(plan.model_path)
        return checkpoint.build_model(device), checkpoint, device

    stamp = os.stat(plan.model_path).st_mtime_ns
    return _cached(("model", plan.model_path, stamp, plan.device), make)


def _worker_host() -> str:
    try:
        from distributed import get_worker

        return get_worker().address.rsplit(":", 1)[0]
    except (ImportError, ValueError):
        return ""


def _image(plan: Plan) -> ome_io.OmeImage:
    return _cached(
        ("image", plan.input_path, plan.input_axes),
        lambda: ome_io.open_image(plan.input_path, plan.input_axes or None),
    )


def _array(path: str, name: str) -> zarr.Array:
    return zarr.open_array(str(Path(path) / name), mode="r+")


def _frame_region(plan: Plan, frame: int, indices: Sequence[np.ndarray]) -> np.ndarray:
    """Read (C, *spatial) of ``frame`` at the given global index vectors (reflection applied):
    only the bounding box is read, then the indices are taken from it."""
    data = _image(plan).canonical()
    boxes = tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
    if plan.spatial_dims == 2:
        region = data[frame, :, 0][(slice(None), *boxes)]
    else:
        region = data[frame][(slice(None), *boxes)]
    try:
        values = np.asarray(region.compute(scheduler="synchronous"))
    except Exception as error:
        bad = " and ".join(ome_io.damaged_chunks(_image(plan), frame, boxes))
        raise UserInputError(
            f"cannot read frame {frame}, region {[(b.start, b.stop) for b in boxes]} of "
            f"{plan.input_path}{f', damaged chunk {bad}' if bad else ''}"
            f" ({type(error).__name__}: {str(error)[:80]})",
            "the input store is damaged there; repair or re-export it, then rerun with --resume",
        ) from None
    local = np.ix_(*[i - b.start for i, b in zip(indices, boxes, strict=True)])
    return values[(slice(None), *local)]


def _check_finite(values: np.ndarray, plan: Plan, frame: int) -> None:
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        kinds = (("NaN", np.isnan), ("Inf", np.isinf))
        found = " and ".join(name for name, test in kinds if test(values).any())
        raise UserInputError(
            f"frame {frame} of {plan.input_path} contains {found} values",
            "replace them (e.g. with 0) before predicting",
        )


def _output_index(plan: Plan, frame: int, core: Sequence[slice], channels: slice) -> tuple:
    """Index into an output array with the input's axes (t, c, z, y, x subset)."""
    axes = plan.input_axes
    spatial = dict(zip("zyx"[-plan.spatial_dims :], core, strict=True))
    index = []
    for axis in axes:
        if axis == "t":
            index.append(frame)
        elif axis == "c":
            index.append(channels)
        elif axis in spatial:
            index.append(spatial[axis])
        else:  # a z axis of length 1 in 2D data
            index.append(slice(0, 1))
    return tuple(index)


def _squeeze_like(plan: Plan, values: np.ndarray) -> np.ndarray:
    """Shape (C, *spatial) values for assignment into :func:`_output_index`."""
    axes = plan.input_axes
    shaped = values if "c" in axes else values[0]
    if "z" in axes and plan.spatial_dims == 2:
        shaped = shaped[:, None] if "c" in axes else shaped[None]
    return shaped


# --- marker files: what is done, for --resume ----------------------------------------------


def _marker(plan: Plan, stage: str, frame: int, block: Block) -> Path:
    return Path(plan.output_path) / WORK_DIR / stage / f"{frame}_{block.name}.npz"


def _save_marker(path: Path, **values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".partial.npz")
    np.savez(temporary, **values)
    os.replace(temporary, path)


def _load_marker(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# --- stage 1: OCEs -------------------------------------------------------------------------


def oce_task(plan: Plan, frame: int, block: Block) -> dict[str, np.ndarray]:
    """Predict OCEs of one block, write them and the image copy, return its std histogram."""
    marker = _marker(plan, "oce", frame, block)
    done = _load_marker(marker)
    if done is not None:
        return done
    model, checkpoint, device = _load_model(plan)
    halo = plan.network_context
    indices = []
    for start, size, length in zip(block.start, block.shape, plan.spatial_shape, strict=True):
        read = smallest_valid_size_at_least(size + 2 * halo, checkpoint.model_config.depth)
        indices.append(reflect_indices(start - halo, start - halo + read, length))
    raw = _frame_region(plan, frame, indices)
    _check_finite(raw, plan, frame)
    image = checkpoint.normalisation.apply(raw)
    grids = [
        i.reshape([-1 if a == axis else 1 for a in range(len(indices))])
        for axis, i in enumerate(indices)
    ]
    seg = plan.segmentation
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
    core_raw = raw[(slice(None),) + tuple(slice(halo, halo + s) for s in block.shape)]
    embeddings = np.concatenate([offsets, std[None]]).astype(np.float32)
    _write_embeddings(plan, frame, block, embeddings)
    copy = _array(plan.output_path, "0")
    copy[_output_index(plan, frame, block.core, slice(None))] = _squeeze_like(
        plan, core_raw.astype(copy.dtype)
    )
    bins = np.clip(
        np.searchsorted(HIST_EDGES, std.ravel(), side="right") - 1, 0, len(HIST_EDGES) - 2
    )
    counts = np.bincount(bins, minlength=len(HIST_EDGES) - 1)
    sums = np.stack(
        [np.bincount(bins, weights=o.ravel(), minlength=len(HIST_EDGES) - 1) for o in offsets]
    )
    occupied = np.flatnonzero(counts)  # stored sparse: a block's std spans few bins
    result = {
        "bins": occupied,
        "counts": counts[occupied].astype(np.int64),
        "offset_sums": sums[:, occupied],
        "signal": np.array(bool(core_raw.size and core_raw.max() > core_raw.min())),
        "frame": np.array(frame),
    }
    _save_marker(marker, **result)
    return result


def _intensity(plan: Plan, frame: int, region: Sequence[slice]) -> np.ndarray:
    """Raw intensity of a frame region, averaged over channels, as float32."""
    indices = [np.arange(r.start, r.stop) for r in region]
    raw = _frame_region(plan, frame, indices)
    _check_finite(raw, plan, frame)
    return raw.astype(np.float32).mean(axis=0)


def range_task(plan: Plan, frame: int, block: Block) -> dict[str, np.ndarray]:
    """Watershed baseline, pass 1: intensity range of one block."""
    values = _intensity(plan, frame, block.core)
    return {"low": np.array(values.min()), "high": np.array(values.max())}


def intensity_task(
    plan: Plan, frame: int, block: Block, low: float, high: float
) -> dict[str, np.ndarray]:
    """Watershed baseline, pass 2: copy the image block, histogram its intensity."""
    marker = _marker(plan, "oce", frame, block)
    done = _load_marker(marker)
    if done is not None:
        return done
    indices = [np.arange(r.start, r.stop) for r in block.core]
    raw = _frame_region(plan, frame, indices)
    _check_finite(raw, plan, frame)
    copy = _array(plan.output_path, "0")
    copy[_output_index(plan, frame, block.core, slice(None))] = _squeeze_like(
        plan, raw.astype(copy.dtype)
    )
    values = raw.astype(np.float32).mean(axis=0)
    counts, _ = np.histogram(values, bins=INTENSITY_BINS, range=(low, max(high, low + 1e-6)))
    occupied = np.flatnonzero(counts)
    result = {
        "bins": occupied,
        "counts": counts[occupied].astype(np.int64),
        "signal": np.array(bool(values.size and values.max() > values.min())),
        "frame": np.array(frame),
        "low": np.array(low),
        "high": np.array(high),
    }
    _save_marker(marker, **result)
    return result


def _watershed_inputs(plan: Plan, stats: Statistics, frame: int, block: Block):
    from cellulus_scale.kernels.watershed import watershed_markers

    region = block.grown(plan.segmentation.clustering_halo, plan.spatial_shape)
    values = _intensity(plan, frame, region)
    markers, count, distance, foreground = watershed_markers(
        values, stats.threshold, plan.segmentation.diameter
    )
    return region, markers, count, distance, foreground


def _write_embeddings(plan: Plan, frame: int, block: Block, values: np.ndarray) -> None:
    array = _array(plan.output_path, f"{EMBEDDINGS_NAME}/0")
    index = (frame, slice(None)) + block.core
    array[index] = values


def _read_embeddings(plan: Plan, frame: int, region: Sequence[slice]) -> np.ndarray:
    array = zarr.open_array(str(Path(plan.output_path) / EMBEDDINGS_NAME / "0"), mode="r")
    return array[(frame, slice(None)) + tuple(region)]


class HistogramTotals:
    """The block histograms of the first stage, summed as blocks finish (O(bins) memory)."""

    def __init__(self, plan: Plan) -> None:
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
    """Otsu threshold on the pooled std histogram and the mean foreground offset (per video)."""
    from skimage.filters import threshold_otsu

    counts, signal = totals.counts, totals.signal
    if plan.method == "watershed":
        from cellulus_scale.kernels.watershed import otsu_from_histogram

        low, high = totals.low, totals.high
        edges = np.linspace(low, max(high, low + 1e-6), INTENSITY_BINS + 1)
        threshold = (
            float(plan.segmentation.threshold)
            if plan.segmentation.threshold is not None
            else otsu_from_histogram(counts, edges)
        )
        fraction = float(counts[edges[1:] > threshold].sum() / max(1, counts.sum()))
        return Statistics(threshold, (0.0,) * plan.spatial_dims, tuple(signal), fraction)
    sums = totals.sums
    centres = 0.5 * (HIST_EDGES[:-1] + HIST_EDGES[1:])
    if plan.segmentation.threshold is not None:
        threshold = float(plan.segmentation.threshold)
        last = int(np.searchsorted(centres, threshold, side="left")) - 1
    else:
        occupied = np.flatnonzero(counts)
        lo, hi = occupied[0], occupied[-1] + 1
        if hi - lo < 2:
            last = hi - 1
        else:
            otsu = threshold_otsu(hist=(counts[lo:hi], centres[lo:hi]))
            last = lo + int(np.searchsorted(centres[lo:hi], otsu, side="left"))
        threshold = float(HIST_EDGES[last + 1])
    foreground = counts[: last + 1].sum()
    if foreground:
        mean_offset = tuple(float(v) for v in sums[:, : last + 1].sum(axis=1) / foreground)
    else:
        mean_offset = (0.0,) * plan.spatial_dims
    return Statistics(threshold, mean_offset, tuple(signal), float(foreground / counts.sum()))


# --- stage 3: centres ------------------------------------------------------------------------


def _grown_embeddings(
    plan: Plan, stats: Statistics, frame: int, block: Block
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    region = block.grown(plan.segmentation.clustering_halo, plan.spatial_shape)
    values = _read_embeddings(plan, frame, region)
    origin = [r.start for r in region]
    embeddings = embeddings_of(values[:-1], origin, np.asarray(stats.mean_offset))
    foreground = values[-1] < stats.threshold
    return region, embeddings, foreground


def centres_task(plan: Plan, stats: Statistics, frame: int, block: Block) -> dict[str, np.ndarray]:
    """Mean-shift on the grown block; keep the centres whose owner is this block."""
    marker = _marker(plan, "centres", frame, block)
    done = _load_marker(marker)
    if done is not None:
        return done
    seg = plan.segmentation
    centres = np.zeros((0, plan.spatial_dims))
    if stats.frames_with_signal[frame] and plan.method == "watershed":
        region, markers, count, _, _ = _watershed_inputs(plan, stats, frame, block)
        from cellulus_scale.kernels.watershed import marker_positions

        centres = marker_positions(markers, count) + np.array([r.start for r in region])
        owners = owner_index(centres, plan.spatial_shape, plan.block_size)
        centres = centres[np.all(owners == np.asarray(block.index), axis=1)].astype(float)
    elif stats.frames_with_signal[frame]:
        region, embeddings, foreground = _grown_embeddings(plan, stats, frame, block)
        sample = fit_sample_mask(
            foreground.shape, [r.start for r in region], frame, seg.seed, seg.fit_fraction
        )
        centres = find_centres(embeddings, foreground, sample, seg.bandwidth, seg.clustering)
        if len(centres):
            owners = owner_index(centres, plan.spatial_shape, plan.block_size)
            centres = centres[np.all(owners == np.asarray(block.index), axis=1)]
    result = {"centres": centres, "frame": np.array(frame)}
    _save_marker(marker, **result)
    return result


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


# --- stage 4: labels -----------------------------------------------------------------------


def labels_task(
    plan: Plan, stats: Statistics, frame: int, block: Block, centres: np.ndarray, ids: np.ndarray
) -> dict[str, np.ndarray]:
    """Assign, post-process on the grown block, and write the block's core of the labels."""
    marker = _marker(plan, "labels", frame, block)
    done = _load_marker(marker)
    if done is not None:
        return done
    clock = {"start": time.perf_counter()}  # when each part ended, for the benchmark
    seg = plan.segmentation
    target = _array(plan.output_path, f"labels/{LABELS_NAME}/0")
    core_labels = np.zeros(block.shape, dtype=target.dtype)
    if stats.frames_with_signal[frame] and len(centres) and plan.method == "watershed":
        from cellulus_scale.kernels.watershed import watershed_from_markers

        region, _, _, distance, foreground = _watershed_inputs(plan, stats, frame, block)
        origin = np.array([r.start for r in region])
        local = np.round(centres).astype(np.int64) - origin
        inside = np.all((local >= 0) & (local < np.array(foreground.shape)), axis=1)
        markers = np.zeros(foreground.shape, dtype=np.int64)
        markers[tuple(local[inside].T)] = ids[inside].astype(np.int64)
        labels = watershed_from_markers(distance, foreground, markers, seg.diameter)
        inner = tuple(
            slice(a - r.start, b - r.start)
            for a, b, r in zip(block.start, block.stop, region, strict=True)
        )
        core_labels = labels[inner].astype(target.dtype)
    elif stats.frames_with_signal[frame] and len(centres):
        region, embeddings, foreground = _grown_embeddings(plan, stats, frame, block)
        reach = seg.assign_distance + seg.clustering_halo
        low = np.array([r.start for r in region]) - reach
        high = np.array([r.stop for r in region]) + reach
        near = np.all((centres >= low) & (centres <= high), axis=1)
        labels = assign_to_centres(
            embeddings, foreground, centres[near], ids[near], seg.assign_distance, target.dtype
        )
        clock["stitching"] = time.perf_counter()
        intensity = None
        if seg.mode == "nucleus":
            indices = [np.arange(r.start, r.stop) for r in region]
            intensity = _frame_region(plan, frame, indices).astype(np.float32).mean(axis=0)
        labels = postprocess(
            labels,
            intensity,
            seg.mode,
            seg.grow_distance,
            seg.shrink_distance,
            seg.min_size(plan.spatial_dims),
        )
        inner = tuple(
            slice(a - r.start, b - r.start)
            for a, b, r in zip(block.start, block.stop, region, strict=True)
        )
        core_labels = labels[inner]
        clock["post-processing"] = time.perf_counter()
    target[_output_index(plan, frame, block.core, slice(0, 1))] = _squeeze_like(
        plan, core_labels[None]
    )
    clock["writing"] = time.perf_counter()
    moments = list(clock.values())
    result = {
        "objects": np.unique(core_labels[core_labels > 0]),
        "seconds": np.array([b - a for a, b in zip(moments, moments[1:], strict=False)]),
        "parts": np.array(list(clock)[1:]),
    }
    _save_marker(marker, **result)
    return result


# --- orchestration ---------------------------------------------------------------------------


def default_block_size(spatial_dims: int) -> int:
    """256 px blocks in 2D, 64 voxels in 3D: a few hundred MB per worker for the paper's model."""
    return 256 if spatial_dims == 2 else 64


def smallest_block_size(depth: int, diameter: float) -> int:
    """The smallest block the halos and the depth-``depth`` pooling grid allow."""
    step = 2**depth
    minimum = max(2 * context(depth), int(math.ceil(diameter)), step)
    return math.ceil(minimum / step) * step


def check_block_size(block_size: int, depth: int, diameter: float) -> None:
    """Refuse blocks the halos or the network's pooling grid cannot work with."""
    step = 2**depth
    minimum = max(2 * context(depth), int(math.ceil(diameter)), step)
    if block_size < minimum:
        raise UserInputError(
            f"block size {block_size} is smaller than the halos allow (network context "
            f"{context(depth)} px per side, object diameter {diameter:g} px)",
            f"use --block-size {math.ceil(minimum / step) * step} or more",
        )
    if block_size % step:
        lower, upper = block_size // step * step, (block_size // step + 1) * step
        raise UserInputError(
            f"block size {block_size} is not a multiple of {step}, the depth-{depth} network's"
            " pooling grid",
            f"use --block-size {lower} or {upper}",
        )


def _run_stage(
    client: Any,
    name: str,
    function: Callable,
    args: list[tuple],
    progress: bool,
    collect: Callable[[Any], None] | None = None,
    resources: dict[str, float] | None = None,
) -> list[Any]:
    """Run ``function`` on every argument tuple; return the results in order, or hand each to
    ``collect`` as it arrives (and return nothing) so that they need not all be held.
    ``resources`` (e.g. ``{"GPU": 1}``) restricts the tasks to workers that advertise them."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    futures = [
        client.submit(function, *a, pure=False, retries=2, resources=resources) for a in args
    ]
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    with tqdm(
        total=len(futures), desc=name, unit="block", disable=None if progress else True
    ) as bar:
        try:
            for future in as_completed(futures):
                if collect is None:
                    results[index[future.key]] = future.result()
                else:
                    collect(future.result())
                    future.release()
                bar.update()
        except OSError as error:  # a full disk or a read-only output, met by a task
            client.cancel(futures)
            if error.errno is None:  # e.g. distributed's CommClosedError: not a file's error
                raise
            output = args[0][0].output_path  # every stage's tasks take the Plan first
            raise UserInputError(
                f"{error.strerror} in the output {output} (stage {name})",
                "free space or make it writable, then rerun the same command with --resume",
            ) from None
        except BaseException:
            client.cancel(futures)
            raise
    return results if collect is None else []


def prepare_labels(plan: Plan, image: ome_io.OmeImage, root: zarr.Group, objects: int) -> None:
    """Create the label array, in the dtype the object count needs, unless a resumed run
    already has it; a new array invalidates the label blocks recorded before."""
    dtype = ome_io.label_dtype(objects)
    labels_path = Path(plan.output_path) / "labels" / LABELS_NAME / "0"
    if labels_path.exists() and zarr.open_array(str(labels_path), mode="r").dtype == dtype:
        return
    _, label_shape = ome_io.label_axes_shape(image)
    ome_io.create_labels(
        root, LABELS_NAME, label_shape, _chunks(plan, image.axes, label_shape), dtype
    )
    for stale in (Path(plan.output_path) / WORK_DIR / "labels").glob("*.npz"):
        stale.unlink()


def _count_done(plan: Plan, stage: str, work: list[tuple[int, Block]]) -> int:
    return sum(_marker(plan, stage, f, b).exists() for f, b in work)


def _prepare_output(
    plan: Plan, image: ome_io.OmeImage, overwrite: bool, resume: bool
) -> zarr.Group:
    out = Path(plan.output_path)
    if resume:
        status = ome_io.run_status(out) if out.exists() else {}
        if status.get("status") != "incomplete":
            what = "is complete" if status.get("status") == "complete" else "has no interrupted run"
            raise UserInputError(f"--resume: {out} {what}", "drop --resume (and pass --overwrite)")
        if status.get("plan") != json.loads(json.dumps(plan.to_json())):
            raise UserInputError(
                f"--resume: the settings differ from those of the interrupted run in {out}",
                "rerun with the same input, model and options, or start again with --overwrite",
            )
        return ome_io.open_group_for_update(out)
    ome_io.check_output_path(out, overwrite, inputs=[image.path])
    if out.exists():
        ome_io.remove_store(out)
    root = ome_io.create_group(out)
    ome_io.mark_status(root, "incomplete", command="predict", plan=plan.to_json())
    spatial_chunks = tuple(plan.block_size)
    chunks = _chunks(plan, image.axes, image.data.shape)
    ome_io.create_level0(root, image.data.shape, chunks, image.data.dtype)
    embeddings = root.create_group(EMBEDDINGS_NAME)
    ome_io.create_level0(
        embeddings,
        (plan.frames, plan.spatial_dims + 1, *plan.spatial_shape),
        (1, plan.spatial_dims + 1, *spatial_chunks),
        np.float32,
    )
    return root


def _chunks(plan: Plan, axes: str, shape: Sequence[int]) -> tuple[int, ...]:
    spatial = dict(zip("zyx"[-plan.spatial_dims :], plan.block_size, strict=True))
    chunks = []
    for axis, size in zip(axes, shape, strict=True):
        if axis == "t":
            chunks.append(1)
        elif axis == "c":
            chunks.append(size)
        else:
            chunks.append(min(size, spatial.get(axis, 1)))
    return tuple(chunks)


@contextlib.contextmanager
def run_session(
    plan: Plan,
    image: ome_io.OmeImage,
    client: Any,
    scheduler: str | None,
    workers: int | None,
    overwrite: bool,
    resume: bool,
    progress: bool,
) -> Iterator[tuple[Any, Plan, zarr.Group]]:
    """The Dask client of a run (``client``, or a cluster started for it), the plan sized to
    its workers, and the prepared output store."""
    from cellulus_scale.blockwise.cluster import dask_client, local_gpu_count, threads_per_host

    if client is not None:
        manager = contextlib.nullcontext(client)
    else:  # a local cluster: with a worker per GPU where the network runs on GPUs
        uses_gpu = plan.method != "watershed" and plan.device != "cpu" and scheduler is None
        gpus = local_gpu_count() if uses_gpu else 0
        manager = dask_client(scheduler, workers, gpus=gpus)
    with manager as dask:
        if progress and dask.dashboard_link:
            print(f"Dask dashboard: {dask.dashboard_link}", flush=True)
        plan = replace(plan, torch_threads=threads_per_host(dask))
        yield dask, plan, _prepare_output(plan, image, overwrite, resume)


def make_plan(
    image: ome_io.OmeImage,
    output_path: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    segmentation: SegmentationConfig,
    checkpoint: Checkpoint | None,
    block_size: int | None,
    device: str,
    method: str = "cellulus",
) -> Plan:
    """Check the inputs against each other and fix every setting of the run."""
    frames, channels, depth, height, width = image.canonical_shape
    spatial = (depth, height, width) if image.spatial_dims == 3 else (height, width)
    if checkpoint is not None:
        check_compatible(checkpoint, image.spatial_dims, channels, str(image.path))
    if segmentation.diameter > min(spatial):
        raise UserInputError(
            f"--diameter {segmentation.diameter:g} is larger than the frame"
            f" ({'x'.join(map(str, spatial))})",
            "give the typical object diameter in pixels",
        )
    model_depth = checkpoint.model_config.depth if checkpoint is not None else 0
    if block_size is None:  # the default, grown where a deep network needs larger blocks
        default = default_block_size(image.spatial_dims)
        size = max(default, smallest_block_size(model_depth, segmentation.diameter))
    else:
        size = block_size
    check_block_size(size, model_depth, segmentation.diameter)
    return Plan(
        input_path=str(image.path),
        input_axes=image.axes,
        output_path=str(Path(output_path)),
        model_path=str(Path(model_path).resolve()) if model_path is not None else "",
        segmentation=segmentation,
        block_size=tuple(min(size, s) if s >= size else size for s in spatial),
        frames=frames,
        channels=channels,
        spatial_shape=spatial,
        network_context=context(model_depth) if checkpoint is not None else 0,
        device=device,
        method=method,
    )


def predict(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    model_path: str | os.PathLike[str] | None,
    diameter: float,
    method: str = "cellulus",
    block_size: int | None = None,
    tta: int = default_of(SegmentationConfig, "tta_passes"),
    mode: str = default_of(SegmentationConfig, "mode"),
    threshold: float | None = None,
    clustering: str = default_of(SegmentationConfig, "clustering"),
    precision: str = default_of(SegmentationConfig, "precision"),
    scheduler: str | None = None,
    workers: int | None = None,
    save_embeddings: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    axes: str | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    client: Any = None,
    prob_threshold: float = 0.5,
    nms_threshold: float = 0.4,
) -> PredictResult:
    """Segment every frame of an OME-Zarr image blockwise on Dask; write ``out.zarr`` with a
    copy of the image and the instance labels ``labels/cellulus`` (NGFF 0.4)."""
    from cellulus_scale.blockwise.cluster import network_resources

    image = ome_io.open_image(input_path, axes)
    ome_io.check_complete(image.path)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserInputError(
                "--device cuda was asked for but no CUDA GPU is available",
                "use --device auto or cpu",
            )
    segmentation = SegmentationConfig(
        diameter=diameter,
        tta_passes=tta,
        mode=mode,
        threshold=threshold,
        clustering=clustering,
        precision=precision,
        seed=seed,
        prob_threshold=prob_threshold,
        nms_threshold=nms_threshold,
    )
    if method not in ("cellulus", "watershed"):
        raise UserInputError(f"unknown method '{method}'", "use cellulus or watershed")
    if method == "cellulus":
        if model_path is None:
            raise UserInputError("--model is missing", "pass --model MODEL.pt from 'train'")
        checkpoint = load_checkpoint(model_path)
        if checkpoint.kind == "stardist":  # supervised refinement: see predict_stardist.py
            method = "stardist"
        elif checkpoint.kind != "oce":
            load_checkpoint(model_path, kind="oce")  # refuses, naming the kind
    else:
        checkpoint = None
    plan = make_plan(
        image, output_path, model_path, segmentation, checkpoint, block_size, device, method
    )
    if not resume:
        ome_io.check_output_path(plan.output_path, overwrite, inputs=[image.path])
    if plan.method == "stardist":
        from cellulus_scale.predict_stardist import predict_stardist

        return predict_stardist(
            plan,
            image,
            checkpoint,
            scheduler,
            workers,
            client,
            overwrite,
            resume,
            save_embeddings,
            progress,
        )
    timings: dict[str, float] = {}
    recomputed: dict[str, int] = {}
    work = [(frame, block) for frame in range(plan.frames) for block in plan.blocks]

    with run_session(plan, image, client, scheduler, workers, overwrite, resume, progress) as (
        dask,
        plan,
        root,
    ):
        start = time.perf_counter()
        recomputed["oce"] = len(work) - _count_done(plan, "oce", work)
        totals = HistogramTotals(plan)
        if plan.method == "watershed":
            ranges = _run_stage(
                dask, "range", range_task, [(plan, f, b) for f, b in work], progress
            )
            low = min(float(r["low"]) for r in ranges)
            high = max(float(r["high"]) for r in ranges)
            arguments = [(plan, f, b, low, high) for f, b in work]
            _run_stage(dask, "intensity", intensity_task, arguments, progress, totals.add)
        else:
            arguments = [(plan, f, b) for f, b in work]
            gpu = network_resources(dask, plan.device)  # GPU workers, if any, run the network
            _run_stage(dask, "OCEs", oce_task, arguments, progress, totals.add, gpu)
        timings["network"] = time.perf_counter() - start

        start = time.perf_counter()
        stats = compute_statistics(plan, totals)
        ome_io.mark_status(root, "incomplete", statistics=asdict(stats))
        timings["statistics"] = time.perf_counter() - start

        start = time.perf_counter()
        recomputed["centres"] = len(work) - _count_done(plan, "centres", work)
        found = _run_stage(
            dask, "clustering", centres_task, [(plan, stats, f, b) for f, b in work], progress
        )
        centres, ids, objects = number_centres(plan, found)
        timings["clustering"] = time.perf_counter() - start

        start = time.perf_counter()
        prepare_labels(plan, image, root, objects)
        recomputed["labels"] = len(work) - _count_done(plan, "labels", work)
        parts: dict[str, float] = {}
        scattered = {
            f: dask.scatter([centres[f], ids[f]], broadcast=False) for f in range(plan.frames)
        }
        _run_stage(
            dask,
            "labels",
            labels_task,
            [(plan, stats, f, b, *scattered[f]) for f, b in work],
            progress,
            collect=lambda r: parts.update(
                {
                    k: parts.get(k, 0.0) + float(v)
                    for k, v in zip(r["parts"], r["seconds"], strict=True)
                }
            ),
        )
        wall = time.perf_counter() - start
        busy = sum(parts.values()) or 1.0
        for part, seconds in parts.items():  # the stage's wall time, split by task-time share
            key = "writing labels" if part == "writing" else str(part)
            timings[key] = wall * seconds / busy

    start = time.perf_counter()
    finish_output(plan, image, root, save_embeddings, stats, objects)
    timings["writing"] = time.perf_counter() - start
    return PredictResult(Path(plan.output_path), objects, stats, len(work), recomputed, timings)


def finish_output(
    plan: Plan,
    image: ome_io.OmeImage,
    root: zarr.Group,
    save_embeddings: bool,
    stats: Statistics,
    objects: int,
) -> None:
    """Pyramids and NGFF metadata, then mark the store complete (the last write of a run)."""
    ome_io.finish_multiscale(root, image.axes, image.scale, Path(plan.input_path).stem)
    label_axes, _ = ome_io.label_axes_shape(image)
    ome_io.finish_labels(root, LABELS_NAME, label_axes, image.scale)
    embeddings_path = Path(plan.output_path) / EMBEDDINGS_NAME
    if save_embeddings:
        spatial_scale = image.canonical_scale[-plan.spatial_dims :]
        axes = "tc" + "zyx"[-plan.spatial_dims :]
        ome_io.finish_multiscale(
            root[EMBEDDINGS_NAME],
            axes,
            (image.canonical_scale[0], 1.0, *spatial_scale),
            EMBEDDINGS_NAME,
            levels=1,
        )
    else:
        ome_io.remove_store(embeddings_path)
    ome_io.remove_store(Path(plan.output_path) / WORK_DIR)
    ome_io.mark_status(root, "complete", objects=objects, statistics=asdict(stats))
