"""Score the instance labels of an OME-Zarr store against ground-truth labels, frame by frame.

Each time point is one frame (a 2D image, or a z-stack for 3D data). Frames are scored
blockwise: one Dask task per frame reads only that frame of both label images and returns its
:class:`~cellulus_scale.evaluation.metrics.FrameScores`, so a video larger than memory can be
evaluated. The per-frame scores are pooled with
:func:`~cellulus_scale.evaluation.metrics.combine` (see :mod:`cellulus_scale.evaluation.metrics`
for the conventions).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from cellulus_scale.errors import UserInputError
from cellulus_scale.evaluation.metrics import (
    SCALAR_SCORES,
    FrameScores,
    check_same_shape,
    combine,
    score_frame,
)
from cellulus_scale.io import ome_zarr
from cellulus_scale.io.location import Location

_TABLE_COLUMNS = ("frame", *SCALAR_SCORES)


@dataclass(frozen=True)
class EvaluationReport:
    """Scores of every frame (``frames[t]`` is time point ``t``) and of all frames pooled."""

    frames: list[FrameScores]
    overall: FrameScores
    pred_path: Path
    truth_path: Path
    pred_labels: str
    truth_labels: str

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per frame, then the pooled ``"all"`` row (``FrameScores.as_dict``)."""
        rows: list[dict[str, Any]] = [
            {"frame": t, **scores.as_dict()} for t, scores in enumerate(self.frames)
        ]
        rows.append({"frame": "all", **self.overall.as_dict()})
        return rows

    def table(self) -> str:
        """A fixed-width text table: one row per frame, then the pooled ``all`` row."""
        cells = [list(_TABLE_COLUMNS)]
        for row in self.rows():
            cells.append([_format_cell(row[name]) for name in _TABLE_COLUMNS])
        widths = [max(len(line[i]) for line in cells) for i in range(len(_TABLE_COLUMNS))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return (
            f"prediction: {self.pred_path} labels/{self.pred_labels}\n"
            f"truth:      {self.truth_path} labels/{self.truth_labels}\n"
            f"{self.table()}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: inputs, IoU thresholds, pooled and per-frame scores (NaN -> None)."""
        return _json_safe(
            {
                "prediction": {"path": str(self.pred_path), "labels": self.pred_labels},
                "truth": {"path": str(self.truth_path), "labels": self.truth_labels},
                "thresholds": list(self.overall.thresholds),
                "overall": self.overall.as_dict(),
                "frames": [
                    {"frame": t, **scores.as_dict()} for t, scores in enumerate(self.frames)
                ],
            }
        )

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON (NaN written as ``null``); returns the path."""
        path = Path(path)
        _check_writable(path)
        with path.open("w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, allow_nan=False)
            handle.write("\n")
        return path

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write one CSV row per frame plus an ``all`` row; NaN is an empty field."""
        path = Path(path)
        _check_writable(path)
        rows = self.rows()
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if _is_nan(v) else v for k, v in row.items()})
        return path


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if _is_nan(value):
        return None
    return value


def _check_writable(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise UserInputError(f"the folder {parent} does not exist", "create it first")


def _label_frames(image: ome_zarr.OmeImage, what: str) -> da.Array:
    """The labels as a 4D (t, z, y, x) Dask array, refusing several channels or float values."""
    data = image.canonical()
    if data.shape[1] != 1:
        raise UserInputError(
            f"the {what} labels {image.path} (axes '{image.axes}') have {data.shape[1]} channels",
            "label images must have a single channel (a 'c' axis of length 1, or none)",
        )
    if data.dtype.kind not in "iub":
        raise UserInputError(
            f"the {what} labels {image.path} have dtype {data.dtype}, not an integer type",
            "evaluate instance label images (integer IDs, 0 = background)",
        )
    return data[:, 0]


def _check_shapes(
    truth: ome_zarr.OmeImage, pred: ome_zarr.OmeImage, t_a: da.Array, p_a: da.Array
) -> None:
    try:
        check_same_shape(t_a.shape, p_a.shape)
    except UserInputError as error:
        sizes = ", ".join(
            f"{axis}: {ts} vs {ps}"
            for axis, ts, ps in zip("tzyx", t_a.shape, p_a.shape, strict=True)
            if ts != ps
        )
        raise UserInputError(
            f"prediction labels {pred.path} (axes '{pred.axes}', shape {pred.data.shape}) and "
            f"ground truth {truth.path} (axes '{truth.axes}', shape {truth.data.shape}) differ "
            f"in size (truth vs prediction, {sizes})",
            error.fix,
        ) from None


def _squeeze_z(frame: da.Array) -> da.Array:
    """(z, y, x) -> (y, x) when there is a single plane."""
    return frame[0] if frame.shape[0] == 1 else frame


def _score_pair(truth: np.ndarray, pred: np.ndarray) -> FrameScores:
    return score_frame(np.asarray(truth), np.asarray(pred))


def score_frames(
    pred_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str] | None,
    pred_labels: str,
    truth_labels: str,
    kernel: Callable[[np.ndarray, np.ndarray], Any],
    client: Any = None,
) -> tuple[list[Any], int]:
    """``kernel(truth_frame, pred_frame)`` for every frame of two label images, one Dask task
    per frame, on ``client`` if given, else with Dask's threaded scheduler; the results in frame
    order and the number of z planes. Both stores must be complete, and the label images of
    one size with one channel (length-1 axes may differ)."""
    pred_path = Location.of(pred_path)
    truth_path = Location.of(truth_path) if truth_path is not None else pred_path
    ome_zarr.check_complete(pred_path)
    if truth_path != pred_path:
        ome_zarr.check_complete(truth_path)
    pred = ome_zarr.open_labels(pred_path, pred_labels)
    truth = ome_zarr.open_labels(truth_path, truth_labels)
    pred_frames = _label_frames(pred, "predicted")
    truth_frames = _label_frames(truth, "ground-truth")
    _check_shapes(truth, pred, truth_frames, pred_frames)
    tasks = [
        dask.delayed(kernel, pure=True)(_squeeze_z(truth_frames[t]), _squeeze_z(pred_frames[t]))
        for t in range(truth_frames.shape[0])
    ]
    if client is not None:
        return list(client.gather(client.compute(tasks))), truth_frames.shape[1]
    return list(dask.compute(*tasks, scheduler="threads")), truth_frames.shape[1]


def evaluate(
    pred_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str] | None = None,
    pred_labels: str = "cellulus",
    truth_labels: str = "ground_truth",
    client: Any = None,
) -> EvaluationReport:
    """Score ``labels/<pred_labels>`` of ``pred_path`` against ``labels/<truth_labels>``.

    ``truth_path`` defaults to ``pred_path``. Stores left incomplete by an interrupted run are
    refused, as are label images of different sizes or with several channels. The axes of the
    two label images may differ in length-1 axes (e.g. ``tcyx`` with one channel and ``tyx``).
    Frames are scored in parallel, one Dask task per frame, on ``client`` (a
    ``distributed.Client``) if given, else with Dask's threaded scheduler.
    """
    frames, _ = score_frames(pred_path, truth_path, pred_labels, truth_labels, _score_pair, client)
    return EvaluationReport(
        frames=frames,
        overall=combine(frames),
        pred_path=pred_path,
        truth_path=truth_path,
        pred_labels=pred_labels,
        truth_labels=truth_labels,
    )
