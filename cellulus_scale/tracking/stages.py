"""Linking as stages of the blockwise engine: it reads the written labels, never a whole video.

1. ``link-objects``, one task per (frame t, block): reads the block's core of frames t and t+1
   of the source labels; returns the objects of frame t there (IDs, pixel counts and exact
   coordinate sums) and the pixel overlaps of t with t+1. Recorded, like every stage's result.
2. Per frame and frame pair, the block results are summed (exact integers, so the same for
   every block size). Then one Dask task per frame pair links frame t to t+1
   (:func:`~cellulus_scale.kernels.tracking.link_pair`); over the whole video (small tables),
   divisions whose daughters merge again are dropped, nuclei that the segmentation merged keep
   their tracks when they part, gaps are closed, and the links are numbered into tracks
   (union-find; IDs by first frame, then ID there).
3. ``link-labels``, one task per (frame, block): maps the block's per-frame IDs to track IDs
   and writes its core into ``labels/<target>`` (a new array, so a task retried or redone on
   ``--resume`` writes the same bytes).

Memory per task is set by the block size: two label blocks and their tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cellulus_scale.blockwise.blocks import Block
from cellulus_scale.blockwise.engine import Session, Stage
from cellulus_scale.blockwise.plan import Plan
from cellulus_scale.blockwise.store import WORK_DIR, output_index, squeeze_like
from cellulus_scale.config import TrackingConfig
from cellulus_scale.io import ome_zarr
from cellulus_scale.kernels.tracking import (
    FrameObjects,
    Tracks,
    close_gaps,
    confirm_divisions,
    frame_objects,
    link_pair,
    number_tracks,
    object_statistics,
    overlap_counts,
    pair_overlap,
    resolve_merges,
    sum_objects,
    sum_overlaps,
    typical_diameter,
)

#: The GEFF graph of a linked store: ``OUT.zarr/tracks.geff``.
GEFF_NAME = "tracks.geff"
STAGES = ("link-objects", "link-labels")


@dataclass(frozen=True)
class LinkSettings:
    """What to link: ``labels/<source>`` (per-frame objects) into ``labels/<target>`` (track
    IDs), and how (:class:`~cellulus_scale.config.TrackingConfig`)."""

    source: str = "cellulus"
    target: str = "tracks"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, **self.tracking.to_dict()}

    def record(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The plan's record (a standalone ``link`` run's plan carries these settings)."""
        return {**fields, "link": self.to_json()}


@dataclass(frozen=True)
class LinkResult:
    """What linking found: every frame's objects, the links, the tracks, and the settings with
    the distance used."""

    frames: list[FrameObjects]
    continuations: list[np.ndarray]  # per frame pair t: (k, 2) indices into frames t, t+1
    divisions: list[np.ndarray]  # per frame pair t: (m, 3) mother in t, daughters in t+1
    gaps: list[tuple[int, int, int, int]]  # links across gaps and merges: (frame, index, later
    # frame, index)
    tracks: Tracks
    tracking: TrackingConfig  # with max_distance set
    spatial_dims: int

    def summary(self) -> dict[str, Any]:
        """Counts for the status record and the command line."""
        table = self.tracks.table
        count = len(self.frames)
        return {
            "objects": int(sum(len(f) for f in self.frames)),
            "tracks": int(len(table)),
            "full_length_tracks": int(np.sum((table[:, 1] == 0) & (table[:, 2] == count - 1))),
            "divisions": int(sum(len(d) for d in self.divisions)),
            "gaps_closed": len(self.gaps),
            "max_distance": float(self.tracking.max_distance or 0.0),
        }


# --- reading and writing label blocks ----------------------------------------------------------


def labels_path(plan: Plan, name: str) -> Path:
    return Path(plan.output_path) / "labels" / name / "0"


def read_label_core(plan: Plan, array: zarr.Array, frame: int, block: Block) -> np.ndarray:
    """The block's core of ``frame`` of a label array with the plan's axes, as (*core)."""
    values = np.asarray(array[output_index(plan, frame, block.core, slice(0, 1))])
    return values.reshape(block.shape)


def objects_task(
    plan: Plan, frame: int, block: Block, settings: LinkSettings
) -> dict[str, np.ndarray]:
    """Objects of ``frame`` in the block and their overlaps with the next frame's."""
    source = zarr.open_array(str(labels_path(plan, settings.source)), mode="r")
    current = read_label_core(plan, source, frame, block)
    ids, areas, sums = object_statistics(current, block.start)
    empty = np.zeros(0, np.uint64)
    a, b, counts = empty, empty, np.zeros(0, np.int64)
    if frame + 1 < plan.frames:
        following = read_label_core(plan, source, frame + 1, block)
        a, b, counts = overlap_counts(current, following)
    return {
        "frame": np.array(frame),
        "ids": ids.astype(np.uint64),
        "areas": areas,
        "sums": sums,
        "next_a": a.astype(np.uint64),
        "next_b": b.astype(np.uint64),
        "next_counts": counts,
    }


def relabel_task(
    plan: Plan,
    frame: int,
    block: Block,
    settings: LinkSettings,
    ids: np.ndarray,
    tracks: np.ndarray,
) -> dict[str, np.ndarray]:
    """Write the block's core of ``labels/<target>``: each object's track ID."""
    source = zarr.open_array(str(labels_path(plan, settings.source)), mode="r")
    target = zarr.open_array(str(labels_path(plan, settings.target)), mode="r+")
    values = read_label_core(plan, source, frame, block)
    out = np.zeros(values.shape, target.dtype)
    foreground = values != 0
    if foreground.any():
        index = np.searchsorted(ids, values[foreground].astype(np.uint64))
        out[foreground] = tracks[index]
    target[output_index(plan, frame, block.core, slice(0, 1))] = squeeze_like(plan, out[None])
    return {"frame": np.array(frame)}


# --- the run -----------------------------------------------------------------------------------


class BlockTotals:
    """The ``link-objects`` results, gathered per frame as blocks finish."""

    def __init__(self, frames: int) -> None:
        self.parts: list[list[dict[str, np.ndarray]]] = [[] for _ in range(frames)]

    def add(self, result: dict[str, np.ndarray]) -> None:
        self.parts[int(result["frame"])].append(result)

    def reduce(self, dims: int) -> tuple[list[FrameObjects], list[tuple]]:
        """Every frame's objects and every frame pair's overlaps (by ID), summed."""
        frames, overlaps = [], []
        for parts in self.parts:
            ids, areas, sums = sum_objects(
                [p["ids"] for p in parts],
                [p["areas"] for p in parts],
                [p["sums"] for p in parts],
                dims,
            )
            frames.append(frame_objects(ids, areas, sums))
            overlaps.append(
                sum_overlaps(
                    [p["next_a"] for p in parts],
                    [p["next_b"] for p in parts],
                    [p["next_counts"] for p in parts],
                )
            )
        return frames, overlaps[:-1]


def link_frames(
    first: FrameObjects, second: FrameObjects, overlap: tuple, tracking: TrackingConfig
) -> tuple[np.ndarray, np.ndarray]:
    """One frame pair's task: its continuations and divisions."""
    return link_pair(first, second, pair_overlap(first, second, *overlap), tracking)


def ends_and_starts(
    frames: Sequence[FrameObjects],
    continuations: Sequence[np.ndarray],
    divisions: Sequence,
    links: Sequence[tuple[int, int, int, int]] = (),
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per frame, the objects no link continues (not the last frame's, nor mothers) and the
    objects no link reaches (not the first frame's, nor daughters); ``links`` are further links
    (frame, index, later frame, index)."""
    ends, starts = [], []
    last = len(frames) - 1
    for t, objects in enumerate(frames):
        followed = np.zeros(len(objects), bool)
        preceded = np.zeros(len(objects), bool)
        for source, i, target, j in links:
            if source == t:
                followed[i] = True
            if target == t:
                preceded[j] = True
        if t < last:
            followed[continuations[t][:, 0]] = True
            followed[divisions[t][:, 0]] = True
        if t > 0:
            preceded[continuations[t - 1][:, 1]] = True
            preceded[divisions[t - 1][:, 1:].ravel()] = True
        ends.append(np.flatnonzero(~followed) if t < last else np.zeros(0, np.int64))
        starts.append(np.flatnonzero(~preceded) if t > 0 else np.zeros(0, np.int64))
    return ends, starts


def in_physical_space(
    frames: Sequence[FrameObjects], spacing: Sequence[float] | None
) -> list[FrameObjects]:
    """The frames' objects with centroids in in-plane pixels (voxel index x ``spacing``, the
    voxel size per axis in x pixels), so that a move of one plane counts as the z step."""
    if spacing is None:
        return list(frames)
    scale = np.asarray(spacing, dtype=float)
    return [FrameObjects(f.ids, f.areas, f.centroids * scale) for f in frames]


def run_linking(
    session: Session, settings: LinkSettings, spacing: Sequence[float] | None = None
) -> LinkResult:
    """The linking stages on ``session``'s plan; writes ``labels/<target>`` level 0 (the caller
    finishes it with :func:`finish_tracks`). ``spacing``: the voxel size per spatial axis in x
    pixels (None: isotropic); distances, ``max_distance`` and the typical diameter are then in
    in-plane pixels of physical distance. The result's centroids stay in voxels."""
    plan = session.plan
    dims = plan.spatial_dims
    totals = BlockTotals(plan.frames)
    with session.timed("linking"):
        session.run(
            Stage("link-objects", objects_task, label="objects"),
            shared=(settings,),
            collect=totals.add,
        )
        voxel_frames, overlaps = totals.reduce(dims)
        frames = in_physical_space(voxel_frames, spacing)
        areas = np.concatenate([f.areas for f in frames]) if frames else np.zeros(0)
        volume = 1.0 if spacing is None else float(np.prod(spacing))
        tracking = settings.tracking.with_distance(typical_diameter(areas * volume, dims))
        if len(frames) > 1:
            futures = session.client.map(
                link_frames,
                frames[:-1],
                frames[1:],
                overlaps,
                [tracking] * (len(frames) - 1),
                pure=False,
            )
            linked = session.client.gather(futures)
        else:
            linked = []
        continuations = [c for c, _ in linked]
        divisions = [d for _, d in linked]
        by_index = [
            pair_overlap(frames[t], frames[t + 1], *overlaps[t]) for t in range(len(frames) - 1)
        ]
        continuations, divisions, merged_back = confirm_divisions(
            frames, by_index, continuations, divisions, tracking
        )
        continuations, divisions, merges = resolve_merges(
            frames, by_index, continuations, divisions, tracking, merged_back
        )
        ends, starts = ends_and_starts(frames, continuations, divisions, merges)
        gaps = close_gaps(frames, ends, starts, tracking)
        gaps = sorted(gaps + merges)
        tracks = number_tracks(frames, continuations, divisions, gaps)
        prepare_target(session, settings, len(tracks.table))
        offsets = np.cumsum([0, *[len(f) for f in frames]])
        per_frame = [
            [f.ids, tracks.node_tracks[offsets[t] : offsets[t + 1]]] for t, f in enumerate(frames)
        ]
        session.run(
            Stage("link-labels", relabel_task, label="track labels"),
            shared=(settings,),
            per_frame=session.scatter(per_frame),
        )
    return LinkResult(voxel_frames, continuations, divisions, gaps, tracks, tracking, dims)


def prepare_target(session: Session, settings: LinkSettings, count: int) -> None:
    """Create ``labels/<target>`` (chunked like the plan's blocks, so that every task writes
    whole chunks) unless a resumed run has it in the dtype ``count`` tracks need; a new array
    voids the ``link-labels`` blocks recorded before."""
    plan = session.plan
    dtype = ome_zarr.label_dtype(count)
    path = labels_path(plan, settings.target)
    if path.exists() and zarr.open_array(str(path), mode="r").dtype == dtype:
        return
    source = zarr.open_array(str(labels_path(plan, settings.source)), mode="r")
    chunks = []
    spatial = dict(zip("zyx"[-plan.spatial_dims :], plan.block_size, strict=True))
    for axis, size in zip(plan.input_axes, source.shape, strict=True):
        chunks.append(1 if axis in "tc" else min(size, spatial.get(axis, 1)))
    ome_zarr.create_labels(
        session.root, settings.target, source.shape, chunks, dtype, plan.input_axes
    )
    for stale in (Path(plan.output_path) / WORK_DIR / "link-labels").glob("*.npz"):
        stale.unlink()


def finish_tracks(
    root: zarr.Group,
    plan: Plan,
    settings: LinkSettings,
    result: LinkResult,
    space: ome_zarr.Space,
) -> None:
    """Pyramid and NGFF metadata of ``labels/<target>`` (listed once finished; in the labels'
    physical ``space``), its track table, and the GEFF graph ``OUT.zarr/tracks.geff``."""
    from cellulus_scale.io.tracks import write_track_table
    from cellulus_scale.tracking.export import write_geff

    ome_zarr.unlist_labels(root, settings.target)
    ome_zarr.finish_labels(root, settings.target, space, None)
    write_track_table(plan.output_path, settings.target, result.tracks.table)
    sizes = dict(zip(space.axes, space.scale, strict=True))
    geff_scale = [float(sizes.get(a, 1.0)) for a in "t" + "zyx"[-plan.spatial_dims :]]
    write_geff(
        Path(plan.output_path) / GEFF_NAME,
        result,
        geff_scale,
        labels_path=f"../labels/{settings.target}",
        zarr_format=root.metadata.zarr_format,
    )
