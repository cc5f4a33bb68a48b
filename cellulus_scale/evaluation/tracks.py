"""Tracking scores against ground-truth tracks (``cellulus-scale evaluate --tracks``): the Cell
Tracking Challenge's TRA, DET and LNK and the division F1, computed by ``traccuracy``.

Each frame is one Dask task that reads that frame of both label images and returns its objects
(IDs and centroids) and two matchings: the CTC's (a predicted object matches a true one when it
covers more than half of it; TRA, DET, LNK) and IoU > 0.5 (one-to-one; divisions). The graphs
are built from those small tables: one node per object and frame, an edge between consecutive
appearances of an ID (an edge that skips frames where a gap was closed), and an edge from a
parent's last node to each daughter's first node, with the parents taken from the label image's
track table (:mod:`cellulus_scale.io.tracks`; for a simulated store without one, from its
recorded divisions). The scores are traccuracy's ``CTCMetrics`` and ``DivisionMetrics`` on
those graphs and matchings; no whole video is held in memory.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellulus_scale.errors import UserInputError
from cellulus_scale.evaluation.evaluate import score_frames
from cellulus_scale.evaluation.metrics import overlap_table
from cellulus_scale.io import ome_zarr
from cellulus_scale.io.location import local_store
from cellulus_scale.io.tracks import read_track_table
from cellulus_scale.kernels.tracking import object_statistics

SCORES = ("TRA", "DET", "LNK", "division_precision", "division_recall", "division_f1")


@dataclass(frozen=True)
class TrackScores:
    """Tracking scores of a video; ``division_f1_buffer`` allows a division to be found up to
    ``frame_buffer`` frames early or late."""

    tra: float
    det: float
    lnk: float
    division_precision: float
    division_recall: float
    division_f1: float
    frame_buffer: int
    division_f1_buffer: float
    true_divisions: int
    found_divisions: int
    true_tracks: int
    found_tracks: int
    true_nodes: int
    found_nodes: int
    errors: dict[str, int]  # the AOGM's: fp/fn/ns nodes, fp/fn/ws edges


@dataclass(frozen=True)
class TrackReport:
    scores: TrackScores
    pred_path: Path
    truth_path: Path
    pred_labels: str
    truth_labels: str

    def table(self) -> str:
        s = self.scores
        rows = [
            ("TRA", s.tra),
            ("DET", s.det),
            ("LNK", s.lnk),
            ("division precision", s.division_precision),
            ("division recall", s.division_recall),
            ("division F1", s.division_f1),
        ]
        if s.frame_buffer:
            rows.append((f"division F1, {s.frame_buffer}-frame buffer", s.division_f1_buffer))
        rows += [
            ("divisions (true / found)", f"{s.true_divisions} / {s.found_divisions}"),
            ("tracks (true / found)", f"{s.true_tracks} / {s.found_tracks}"),
            ("objects (true / found)", f"{s.true_nodes} / {s.found_nodes}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(
            f"{name.ljust(width)}  {value:.3f}"
            if isinstance(value, float)
            else f"{name.ljust(width)}  {value}"
            for name, value in rows
        )

    def __str__(self) -> str:
        return (
            f"prediction: {self.pred_path} labels/{self.pred_labels}\n"
            f"truth:      {self.truth_path} labels/{self.truth_labels}\n{self.table()}"
        )

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self.scores)
        return {
            "prediction": {"path": str(self.pred_path), "labels": self.pred_labels},
            "truth": {"path": str(self.truth_path), "labels": self.truth_labels},
            "tracks": {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in values.items()
            },
        }

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        with path.open("w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, allow_nan=False)
            handle.write("\n")
        return path


def _objects(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, areas, sums = object_statistics(labels, (0,) * labels.ndim)
    return ids.astype(np.int64), sums / np.maximum(areas, 1)[:, None]


def frame_matches(truth: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """One frame's objects (IDs, centroids) and matchings (CTC's, and IoU > 0.5) by ID."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    table = overlap_table(truth, pred)
    rows, cols, shared = table.rows, table.cols, table.intersections
    ctc = shared > 0.5 * table.true_areas[rows]
    iou = shared / (table.true_areas[rows] + table.pred_areas[cols] - shared)
    one_to_one = iou > 0.5
    true_ids, true_centres = _objects(truth)
    pred_ids, pred_centres = _objects(pred)
    return {
        "true_ids": true_ids,
        "true_centres": true_centres,
        "pred_ids": pred_ids,
        "pred_centres": pred_centres,
        "ctc": np.stack([table.true_ids[rows[ctc]], table.pred_ids[cols[ctc]]], 1).astype(np.int64),
        "iou": np.stack(
            [table.true_ids[rows[one_to_one]], table.pred_ids[cols[one_to_one]]], 1
        ).astype(np.int64),
    }


def _parents(path: Path, labels: str) -> dict[int, int]:
    """Each track's parent, from the track table; for a simulated store without one, from the
    divisions it recorded."""
    table = read_track_table(path, labels)
    if table is not None:
        return {int(r[0]): int(r[3]) for r in table if r[3]}
    status = ome_zarr.run_status(path)
    if status.get("command") == "simulate" and labels == "ground_truth":
        return {int(d): int(m) for _, m, d in status.get("divisions", [])}
    return {}


def build_graph(
    frames: list[dict[str, np.ndarray]], which: str, parents: dict[int, int]
) -> tuple[Any, dict[tuple[int, int], int]]:
    """The tracking graph (networkx) of one side (``which``: 'true' or 'pred') and its node of
    each (frame, ID)."""
    import networkx as nx

    graph = nx.DiGraph()
    node_of: dict[tuple[int, int], int] = {}
    seen: dict[int, list[int]] = {}
    for t, frame in enumerate(frames):
        ids, centres = frame[f"{which}_ids"], frame[f"{which}_centres"]
        for label, centre in zip(ids, centres, strict=True):
            node = len(node_of)
            node_of[(t, int(label))] = node
            position = dict(zip(("z", "y", "x")[-len(centre) :], map(float, centre), strict=True))
            graph.add_node(node, t=t, segmentation_id=int(label), **position)
            seen.setdefault(int(label), []).append(t)
    for label, times in seen.items():
        for a, b in zip(times, times[1:], strict=False):
            graph.add_edge(node_of[(a, label)], node_of[(b, label)])
    for child, parent in parents.items():
        before = [t for t in seen.get(parent, []) if child in seen and t < seen[child][0]]
        if before:  # the parent's last node before the child's first
            graph.add_edge(node_of[(before[-1], parent)], node_of[(seen[child][0], child)])
    return graph, node_of


def evaluate_tracks(
    pred_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str] | None = None,
    pred_labels: str = "tracks",
    truth_labels: str = "ground_truth",
    frame_buffer: int = 0,
    client: Any = None,
) -> TrackReport:
    """Score the tracks of ``labels/<pred_labels>`` against ``labels/<truth_labels>``."""
    from traccuracy import TrackingGraph
    from traccuracy.matchers import Matched
    from traccuracy.metrics import CTCMetrics, DivisionMetrics

    if frame_buffer < 0:
        raise UserInputError(
            f"--frame-buffer must be >= 0, got {frame_buffer}", "use e.g. --frame-buffer 2"
        )
    pred_path = local_store(pred_path, "evaluate --tracks")
    truth_path = (
        local_store(truth_path, "evaluate --tracks") if truth_path is not None else pred_path
    )
    frames, planes = score_frames(
        pred_path, truth_path, pred_labels, truth_labels, frame_matches, client
    )
    true_parents = _parents(truth_path, truth_labels)
    pred_parents = _parents(pred_path, pred_labels)

    def matched(kind: str, info: dict[str, Any]) -> Any:
        true_graph, true_nodes = build_graph(frames, "true", true_parents)
        pred_graph, pred_nodes = build_graph(frames, "pred", pred_parents)
        mapping = [
            (true_nodes[(t, int(a))], pred_nodes[(t, int(b))])
            for t, frame in enumerate(frames)
            for a, b in frame[kind]
        ]
        locations = ("y", "x") if planes == 1 else ("z", "y", "x")
        return Matched(
            TrackingGraph(true_graph, location_keys=locations, name="truth"),
            TrackingGraph(pred_graph, location_keys=locations, name="prediction"),
            mapping,
            info,
        )

    quiet = logging.getLogger("traccuracy")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # traccuracy's progress bars
            ctc = matched("ctc", {"name": "CTCMatcher"})
            aogm = CTCMetrics().compute(ctc).results
            divisions = matched("iou", {"name": "IOUMatcher", "iou_threshold": 0.5})
            by_buffer = DivisionMetrics(max_frame_buffer=frame_buffer).compute(divisions).results
    finally:
        quiet.setLevel(level)
    exact = by_buffer["Frame Buffer 0"]
    buffered = by_buffer[f"Frame Buffer {frame_buffer}"]
    scores = TrackScores(
        tra=float(aogm["TRA"]),
        det=float(aogm["DET"]),
        lnk=float(aogm["LNK"]),
        division_precision=float(exact["Division Precision"]),
        division_recall=float(exact["Division Recall"]),
        division_f1=float(exact["Division F1"]),
        frame_buffer=frame_buffer,
        division_f1_buffer=float(buffered["Division F1"]),
        true_divisions=int(exact["Total GT Divisions"]),
        found_divisions=int(exact["Total Predicted Divisions"]),
        true_tracks=len({int(i) for f in frames for i in f["true_ids"]}),
        found_tracks=len({int(i) for f in frames for i in f["pred_ids"]}),
        true_nodes=int(sum(len(f["true_ids"]) for f in frames)),
        found_nodes=int(sum(len(f["pred_ids"]) for f in frames)),
        errors={
            k: int(aogm[k])
            for k in ("fp_nodes", "fn_nodes", "ns_nodes", "fp_edges", "fn_edges", "ws_edges")
        },
    )
    return TrackReport(scores, pred_path, truth_path, pred_labels, truth_labels)
