"""The track table of a label image, kept in its NGFF metadata.

A label image whose IDs are tracks (``labels/tracks`` of ``link``, ``labels/ground_truth`` of
``simulate``) carries its track table in its own attributes, ``labels/<name>/.zattrs``::

    "cellulus_scale": {"tracks": {"columns": ["id", "first", "last", "parent"],
                                  "rows": [[1, 0, 49, 0], [2, 0, 12, 0], [3, 13, 49, 2], ...]}}

one row per track: its ID (the label value), its first and last frame, and the ID of the track
it comes from (the mother of a division; 0 for none). This is the Cell Tracking Challenge's
``res_track.txt`` / ``man_track.txt``, except that a track may be missing in some frames between
its first and last (a gap that linking closed); the CTC export splits such a track.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from cellulus_scale.io.ome_zarr import STATUS_KEY

TRACK_COLUMNS = ("id", "first", "last", "parent")


def write_track_table(path: str | os.PathLike[str], labels: str, table: np.ndarray) -> None:
    """Record the track table (rows of :data:`TRACK_COLUMNS`) in the attributes of
    ``labels/<labels>`` of the store ``path`` (opened afresh: a group object held since before
    its metadata was last written would write stale metadata back)."""
    group = zarr.open_group(str(Path(path) / "labels" / labels), mode="r+")
    current = dict(group.attrs.get(STATUS_KEY, {}))
    current["tracks"] = {
        "columns": list(TRACK_COLUMNS),
        "rows": np.asarray(table, np.int64).reshape(-1, 4).tolist(),
    }
    group.attrs[STATUS_KEY] = current


def read_track_table(path: str | os.PathLike[str], labels: str) -> np.ndarray | None:
    """The track table of ``labels/<labels>`` of the store ``path`` as an (n, 4) int64 array,
    or None where the label image has none."""
    try:
        group = zarr.open_group(str(Path(path) / "labels" / labels), mode="r")
    except Exception:  # no such group: no table
        return None
    record = dict(group.attrs.get(STATUS_KEY, {})).get("tracks")
    if not record:
        return None
    return np.asarray(record["rows"], np.int64).reshape(-1, 4)


def table_from_presence(
    first: dict[int, int], last: dict[int, int], parents: dict[int, int] | None = None
) -> np.ndarray:
    """A track table from each ID's first and last frame and, optionally, its parent."""
    parents = parents or {}
    rows = [[i, first[i], last[i], parents.get(i, 0)] for i in sorted(first)]
    return np.asarray(rows, np.int64).reshape(-1, 4)
