"""Exports of linked tracks: a GEFF graph and the Cell Tracking Challenge format.

**GEFF** (:func:`write_geff`, written by every linking run as ``OUT.zarr/tracks.geff``, zarr
v2): one node per object and frame with its frame ``t``, centroid ``z`` (3D), ``y``, ``x`` in
pixels (the axes' ``scale`` holds the image's pixel size), ``seg_id`` (its value in
``labels/tracks`` in that frame) and ``track_id`` (the same: the track, GEFF's tracklet); one
edge per link, from the earlier node to the later, with ``division`` true for the two edges from
a mother to her daughters. A closed gap is an edge that skips frames.

**CTC** (:func:`export_ctc`): ``maskTTT.tif`` per frame (uint16, uint32 beyond 65535 tracks)
and ``res_track.txt`` (``ID first last parent`` per line). The CTC format wants every track
present in every frame from its first to its last, so a track with a closed gap is split there:
the part after the gap gets a new ID whose parent is the part before it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr
from cellulus_scale.io.location import local_store
from cellulus_scale.io.tracks import read_track_table

if TYPE_CHECKING:
    from cellulus_scale.tracking.stages import LinkResult


def geff_arrays(result: LinkResult) -> tuple[np.ndarray, dict, np.ndarray, np.ndarray]:
    """(node ids, node properties, edges (n, 2), division flags) of a linking result."""
    frames = result.frames
    offsets = np.cumsum([0, *[len(f) for f in frames]])
    n = int(offsets[-1])
    dims = result.spatial_dims
    centroids = np.concatenate([f.centroids for f in frames]) if n else np.zeros((0, dims), float)
    times = np.repeat(np.arange(len(frames)), np.diff(offsets))
    tracks = result.tracks.node_tracks
    properties = {"t": times.astype(np.int64)}
    for axis, name in enumerate("zyx"[-dims:]):
        properties[name] = centroids[:, axis].astype(np.float64)
    properties["seg_id"] = tracks.astype(np.int64)
    properties["track_id"] = tracks.astype(np.int64)
    edges, division = [], []
    for t, links in enumerate(result.continuations):
        edges.append(np.stack([offsets[t] + links[:, 0], offsets[t + 1] + links[:, 1]], axis=1))
        division.append(np.zeros(len(links), bool))
    for t, i, later, j in result.gaps:
        edges.append(np.array([[offsets[t] + i, offsets[later] + j]]))
        division.append(np.zeros(1, bool))
    for t, rows in enumerate(result.divisions):
        for mother, d1, d2 in rows:
            edges.append(np.array([[offsets[t] + mother, offsets[t + 1] + d] for d in (d1, d2)]))
            division.append(np.ones(2, bool))
    edge_array = np.concatenate(edges).astype(np.uint64) if edges else np.zeros((0, 2), np.uint64)
    flags = np.concatenate(division) if division else np.zeros(0, bool)
    order = np.lexsort((edge_array[:, 1], edge_array[:, 0])) if len(edge_array) else []
    return np.arange(n, dtype=np.uint64), properties, edge_array[order], flags[order]


def write_geff(
    path: str | os.PathLike[str],
    result: LinkResult,
    scale: Sequence[float],
    labels_path: str | None = None,
    zarr_format: int = 2,
) -> Path:
    """Write the tracks of ``result`` as a GEFF graph at ``path`` (replacing one there), in
    ``zarr_format`` (that of the store around it); ``scale`` is the pixel size per axis
    (t, [z,] y, x); ``labels_path`` the label image the nodes' ``seg_id`` refers to, relative
    to ``path``."""
    import geff
    from geff.core_io import write_arrays
    from geff_spec import Axis, GeffMetadata, RelatedObject

    path = Path(path)
    if path.exists():
        ome_zarr.remove_store(path)
    node_ids, properties, edges, division = geff_arrays(result)
    names = ["t", *"zyx"[-result.spatial_dims :]]
    axes = [
        Axis(name=name, type="time" if name == "t" else "space", scale=float(s))
        for name, s in zip(names, scale, strict=True)
    ]
    related = [RelatedObject(type="labels", path=labels_path, node_prop="seg_id")]
    write_arrays(
        geff_store=str(path),
        node_ids=node_ids,
        node_props={k: {"values": v, "missing": None} for k, v in properties.items()},
        edge_ids=edges,
        edge_props={"division": {"values": division, "missing": None}},
        metadata=GeffMetadata(
            geff_version=geff.__version__,
            axes=axes,
            directed=True,
            node_props_metadata={},
            edge_props_metadata={},
            track_node_props={"tracklet": "track_id"},
            related_objects=related if labels_path else None,
        ),
        zarr_format=zarr_format,
    )
    return path


# --- the Cell Tracking Challenge format ------------------------------------------------------


@dataclass(frozen=True)
class CtcExport:
    """What :func:`export_ctc` wrote."""

    folder: Path
    frames: int
    tracks: int  # lines of res_track.txt (tracks split at gaps count once per part)
    split: int  # tracks split at a gap


def _frame_ids(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    return np.unique(values[values != 0]).astype(np.int64)


def _write_mask(
    values: np.ndarray, path: Path, old: np.ndarray, new: np.ndarray, dtype: np.dtype
) -> None:
    import tifffile

    values = np.asarray(values).astype(np.int64)
    if old.size:
        index = np.searchsorted(old, values)
        hit = (index < old.size) & (old[np.minimum(index, old.size - 1)] == values)
        values[hit] = new[index[hit]]
    tifffile.imwrite(path, values.astype(dtype), compression="zlib")


def ctc_segments(
    table: np.ndarray, presence: Sequence[np.ndarray]
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]], int]:
    """Split the tracks with gaps: (CTC table, per frame (old IDs, new IDs) to rename, number
    of tracks split). ``presence[t]`` lists the track IDs present in frame t. The part after a
    gap gets a new ID (counting on from the largest) whose parent is the part before it; a
    daughter's parent is the last part of her mother."""
    frames_of: dict[int, list[int]] = {}
    for t, ids in enumerate(presence):
        for i in ids:
            frames_of.setdefault(int(i), []).append(t)
    parents = {int(r[0]): int(r[3]) for r in table}
    next_id = max([0, *frames_of, *parents]) + 1
    pieces: dict[int, list[tuple[int, np.ndarray]]] = {}
    for track in sorted(frames_of):
        times = np.asarray(frames_of[track])
        parts = np.split(times, np.flatnonzero(np.diff(times) > 1) + 1)
        named = [(track, parts[0])]
        for part in parts[1:]:
            named.append((next_id, part))
            next_id += 1
        pieces[track] = named
    rows: list[list[int]] = []
    renames: list[dict[int, int]] = [{} for _ in presence]
    for track, named in pieces.items():
        mother = parents.get(track, 0)
        previous = pieces[mother][-1][0] if mother in pieces else 0
        for name, part in named:
            rows.append([name, int(part[0]), int(part[-1]), previous])
            previous = name
            if name != track:
                for t in part:
                    renames[int(t)][track] = name
    table_out = np.asarray(sorted(rows), np.int64).reshape(-1, 4)
    per_frame = []
    for mapping in renames:
        old = np.array(sorted(mapping), np.int64)
        per_frame.append((old, np.array([mapping[o] for o in old], np.int64)))
    split = sum(len(named) > 1 for named in pieces.values())
    return table_out, per_frame, split


def export_ctc(
    store: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    labels: str = "tracks",
    overwrite: bool = False,
    client: Any = None,
) -> CtcExport:
    """Write ``labels/<labels>`` of a linked store in the CTC format into ``folder``: one Dask
    task per frame reads that frame only (twice: the IDs present, then the mask)."""
    import dask

    store, folder = local_store(store, "export-ctc"), Path(folder)
    ome_zarr.check_complete(store)
    image = ome_zarr.open_labels(store, labels)
    table = read_track_table(store, labels)
    if table is None:
        raise UserInputError(
            f"labels/{labels} of {store} have no track table",
            "link the store first ('cellulus-scale link STORE') or name linked labels",
        )
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise UserInputError(
            f"the folder {folder} is not empty", "choose a new folder or pass --overwrite"
        )
    ome_zarr.check_output_path(folder, overwrite=True)
    folder.mkdir(exist_ok=True)
    data = image.canonical()[:, 0]
    data = data[:, 0] if data.shape[1] == 1 else data  # (t, y, x), or (t, z, y, x) in 3D
    count = data.shape[0]

    def compute(tasks: list) -> list:
        if client is not None:
            return list(client.gather(client.compute(tasks)))
        return list(dask.compute(*tasks, scheduler="threads"))

    presence = compute([dask.delayed(_frame_ids)(data[t]) for t in range(count)])
    ctc_table, renames, split = ctc_segments(table, presence)
    dtype = np.dtype(np.uint16) if ctc_table[:, 0].max(initial=0) <= 65535 else np.uint32
    width = max(3, len(str(count - 1)))
    compute(
        [
            dask.delayed(_write_mask)(
                data[t], folder / f"mask{t:0{width}d}.tif", *renames[t], dtype
            )
            for t in range(count)
        ]
    )
    np.savetxt(folder / "res_track.txt", ctc_table, fmt="%d")
    return CtcExport(folder, count, len(ctc_table), split)
