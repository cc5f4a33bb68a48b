"""Instance segmentation metrics: F1, average precision and Cell Tracking Challenge SEG.

All metrics are computed from one sparse contingency table per frame (:func:`overlap_table`),
built with vectorised counting; there is no Python loop over object pairs.

Conventions
-----------
* Label ``0`` is background; every other value is one object. IDs need not be consecutive and
  may be large (``uint32``/``uint64``).
* **Matching.** A true object and a predicted object may be matched at threshold ``t`` when their
  IoU is *strictly* greater than ``t`` (``IoU > t``). Matching is one-to-one. For ``t >= 0.5``
  every object has at most one candidate partner (two disjoint objects cannot both overlap a third
  by more than half), so the candidate pairs *are* the matching. For ``t < 0.5`` the maximum
  number of matches is found with :func:`scipy.optimize.linear_sum_assignment`, ties broken by
  the larger total IoU (as in StarDist), solved separately on each connected group of candidate
  pairs. StarDist uses ``IoU >= t``; the two differ only on exact ties.
* **F1, precision, recall** use matching at ``IoU > 0.5``. When truth and prediction are both
  empty they are all 1.0; otherwise a 0/0 ratio is 0.0 (e.g. recall with no true objects).
* **AP** at threshold ``t`` is ``TP / (TP + FP + FN)`` (the "average precision" of the
  DSB 2018 / StarDist / Cellpose papers, StarDist's "accuracy"); it is 1.0 when truth and
  prediction are both empty. ``ap`` is its mean over ``IoU`` thresholds 0.50, 0.55, ..., 0.95.
* **SEG** (Cell Tracking Challenge): for each true object ``R`` the predicted object ``S`` with
  ``|R ∩ S| > 0.5 |R|`` (unique if any) scores ``|R ∩ S| / |R ∪ S|``, otherwise 0; SEG is the mean
  over true objects. It is ``nan`` for a frame without true objects.
* **Pooling** (:func:`combine`): TP/FP/FN are summed over frames before the ratios are taken;
  SEG is the summed Jaccard over the total number of true objects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from cellulus_scale.errors import UserInputError

F1_THRESHOLD = 0.5
AP_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# The scalar scores of a frame, in table order.
SCALAR_SCORES = ("n_true", "n_pred", "tp", "fp", "fn", "precision", "recall", "f1", "seg", "ap")

# Largest label value for which areas are counted with np.bincount instead of np.unique.
_BINCOUNT_MAX_LABEL = 1 << 22


def check_same_shape(truth_shape: Sequence[int], pred_shape: Sequence[int]) -> None:
    """Raise :class:`UserInputError` unless prediction and ground truth have the same shape."""
    if tuple(truth_shape) != tuple(pred_shape):
        raise UserInputError(
            f"prediction shape {tuple(pred_shape)} differs from ground-truth shape "
            f"{tuple(truth_shape)}",
            "evaluate labels of the same image",
        )


def _as_labels(labels: np.ndarray, what: str) -> np.ndarray:
    """Return ``labels`` as an integer array, rejecting non-integer label images."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.view(np.uint8)
    if labels.dtype.kind not in "iu":
        raise UserInputError(
            f"{what} labels have dtype {labels.dtype}, not an integer type",
            "pass instance label images (integer IDs, 0 = background)",
        )
    return labels


def _compact(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (sorted non-zero IDs, per-pixel index into them or -1 for background, areas)."""
    if flat.size == 0:
        return flat[:0], np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = flat.min(), flat.max()
    if lo >= 0 and int(hi) <= max(_BINCOUNT_MAX_LABEL, flat.size):
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=1)
        counts[0] = 0
        ids = np.flatnonzero(counts)
        lookup = np.full(counts.size, -1, np.int64)
        lookup[ids] = np.arange(ids.size)
        return ids.astype(flat.dtype), lookup[flat], counts[ids].astype(np.int64)
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    foreground = ids != 0
    remap = np.where(foreground, np.cumsum(foreground) - 1, -1)
    return ids[foreground], remap[inverse.ravel()], counts[foreground].astype(np.int64)


@dataclass(frozen=True, eq=False)
class OverlapTable:
    """Sparse contingency table of one frame: pixel overlaps between true and predicted objects.

    ``rows[k]``/``cols[k]`` index ``true_ids``/``pred_ids``; ``intersections[k]`` is the number of
    pixels the two objects share. Only pairs that overlap are listed (sorted by row, then column).
    Areas count every pixel of an object, including those over the other image's background.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_areas: np.ndarray
    pred_areas: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    intersections: np.ndarray

    @property
    def n_true(self) -> int:
        """Number of true objects."""
        return int(self.true_ids.size)

    @property
    def n_pred(self) -> int:
        """Number of predicted objects."""
        return int(self.pred_ids.size)

    def iou(self) -> np.ndarray:
        """Intersection over union of each listed pair, aligned with ``rows``/``cols``."""
        union = self.true_areas[self.rows] + self.pred_areas[self.cols] - self.intersections
        return self.intersections / np.maximum(union, 1)

    def to_sparse(self) -> sparse.csr_matrix:
        """Intersections as a ``(n_true, n_pred)`` sparse matrix."""
        return sparse.csr_matrix(
            (self.intersections, (self.rows, self.cols)), shape=(self.n_true, self.n_pred)
        )


def overlap_table(truth: np.ndarray, pred: np.ndarray) -> OverlapTable:
    """Count pixel overlaps between the objects of two label images of one frame (2D or 3D)."""
    truth = _as_labels(truth, "ground-truth")
    pred = _as_labels(pred, "predicted")
    check_same_shape(truth.shape, pred.shape)
    true_ids, t_idx, true_areas = _compact(truth.ravel())
    pred_ids, p_idx, pred_areas = _compact(pred.ravel())
    n_true, n_pred = true_ids.size, pred_ids.size
    both = (t_idx >= 0) & (p_idx >= 0)
    keys = t_idx[both] * np.int64(n_pred) + p_idx[both]
    if n_true * n_pred <= max(keys.size, _BINCOUNT_MAX_LABEL):
        pair_counts = np.bincount(keys, minlength=n_true * n_pred)
        pairs = np.flatnonzero(pair_counts)
        intersections = pair_counts[pairs]
    else:
        pairs, intersections = np.unique(keys, return_counts=True)
    n_cols = max(n_pred, 1)
    return OverlapTable(
        true_ids=true_ids,
        pred_ids=pred_ids,
        true_areas=true_areas,
        pred_areas=pred_areas,
        rows=(pairs // n_cols).astype(np.int64),
        cols=(pairs % n_cols).astype(np.int64),
        intersections=intersections.astype(np.int64),
    )


def match_pairs(table: OverlapTable, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of pairs with ``IoU > threshold``; returns (rows, cols) indices.

    For ``threshold >= 0.5`` the candidate pairs are already one-to-one. Below that, the number
    of matches is maximised with ``linear_sum_assignment`` (ties: larger total IoU), solved per
    connected group of candidate pairs.
    """
    iou = table.iou()
    ok = iou > threshold
    rows, cols, scores = table.rows[ok], table.cols[ok], iou[ok]
    if threshold >= 0.5 or rows.size == 0:
        return rows, cols
    row_deg = np.bincount(rows, minlength=table.n_true)
    col_deg = np.bincount(cols, minlength=table.n_pred)
    single = (row_deg[rows] == 1) & (col_deg[cols] == 1)
    out_rows, out_cols = [rows[single]], [cols[single]]
    rows, cols, scores = rows[~single], cols[~single], scores[~single]
    if rows.size:
        n_nodes = table.n_true + table.n_pred
        graph = sparse.coo_matrix(
            (np.ones(rows.size), (rows, cols + table.n_true)), shape=(n_nodes, n_nodes)
        )
        _, component = connected_components(graph, directed=False)
        edge_component = component[rows]
        order = np.argsort(edge_component, kind="stable")
        starts = np.flatnonzero(np.diff(edge_component[order], prepend=-1))
        for group in np.split(order, starts[1:]):
            u_rows, r_local = np.unique(rows[group], return_inverse=True)
            u_cols, c_local = np.unique(cols[group], return_inverse=True)
            n_matchable = min(u_rows.size, u_cols.size)
            cost = np.zeros((u_rows.size, u_cols.size))
            cost[r_local, c_local] = -(1.0 + scores[group] / (2.0 * n_matchable))
            r_sel, c_sel = linear_sum_assignment(cost)
            keep = cost[r_sel, c_sel] < 0
            out_rows.append(u_rows[r_sel[keep]])
            out_cols.append(u_cols[c_sel[keep]])
    return np.concatenate(out_rows), np.concatenate(out_cols)


def _ratio(num: float, den: float, both_empty: bool) -> float:
    """``num / den``, with 0/0 read as 1.0 when both images are empty and 0.0 otherwise."""
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


@dataclass(frozen=True)
class FrameScores:
    """Scores of one frame, or of several frames pooled by :func:`combine`.

    ``tp``/``fp``/``fn``, ``precision``, ``recall`` and ``f1`` use matching at ``IoU > 0.5``.
    ``seg_sum`` (summed Jaccard of true objects) and the per-threshold counts ``tp_at``,
    ``fp_at``, ``fn_at`` (aligned with ``thresholds``) are the accumulators used for pooling.
    ``seg`` is ``nan`` when there are no true objects (so two such results never compare equal).
    """

    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    seg: float
    ap: float
    seg_sum: float
    thresholds: tuple[float, ...]
    tp_at: tuple[int, ...]
    fp_at: tuple[int, ...]
    fn_at: tuple[int, ...]

    @classmethod
    def from_counts(
        cls,
        n_true: int,
        n_pred: int,
        tp: int,
        seg_sum: float,
        thresholds: Sequence[float],
        tp_at: Sequence[int],
    ) -> FrameScores:
        """Derive all scores from object counts, matches and the summed SEG Jaccard."""
        n_true, n_pred, tp = int(n_true), int(n_pred), int(tp)
        tp_at = tuple(int(t) for t in tp_at)
        if len(tp_at) != len(thresholds):
            raise ValueError("tp_at must have one count per threshold")
        both_empty = n_true == 0 and n_pred == 0
        fp, fn = n_pred - tp, n_true - tp
        fp_at = tuple(n_pred - t for t in tp_at)
        fn_at = tuple(n_true - t for t in tp_at)
        ap_at = [
            _ratio(t, t + p + n, both_empty) for t, p, n in zip(tp_at, fp_at, fn_at, strict=True)
        ]
        return cls(
            n_true=n_true,
            n_pred=n_pred,
            tp=tp,
            fp=fp,
            fn=fn,
            precision=_ratio(tp, n_pred, both_empty),
            recall=_ratio(tp, n_true, both_empty),
            f1=_ratio(2 * tp, 2 * tp + fp + fn, both_empty),
            seg=float(seg_sum) / n_true if n_true else math.nan,
            ap=float(np.mean(ap_at)) if ap_at else math.nan,
            seg_sum=float(seg_sum),
            thresholds=tuple(float(t) for t in thresholds),
            tp_at=tp_at,
            fp_at=fp_at,
            fn_at=fn_at,
        )

    @property
    def ap_at(self) -> np.ndarray:
        """AP (``TP / (TP + FP + FN)``) at each threshold."""
        tp, fp, fn = (np.asarray(x, dtype=float) for x in (self.tp_at, self.fp_at, self.fn_at))
        den = tp + fp + fn
        empty = 1.0 if self.n_true == 0 and self.n_pred == 0 else 0.0
        return np.divide(tp, den, out=np.full(tp.shape, empty), where=den > 0)

    def as_dict(self) -> dict[str, float | int]:
        """Flat summary (scalars plus ``ap@<threshold>`` entries), e.g. for a CSV row."""
        out: dict[str, float | int] = {name: getattr(self, name) for name in SCALAR_SCORES}
        for threshold, value in zip(self.thresholds, self.ap_at, strict=True):
            out[f"ap@{threshold:.2f}"] = float(value)
        return out


def score_table(table: OverlapTable, thresholds: Sequence[float] = AP_THRESHOLDS) -> FrameScores:
    """Score a frame from its overlap table (see the module docstring for the conventions)."""
    iou = table.iou()
    tp = int(np.count_nonzero(iou > F1_THRESHOLD))
    tp_at = [match_pairs(table, t)[0].size for t in thresholds]
    covers = 2 * table.intersections > table.true_areas[table.rows]
    seg_sum = float(iou[covers].sum())
    return FrameScores.from_counts(table.n_true, table.n_pred, tp, seg_sum, thresholds, tp_at)


def score_frame(
    truth: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = AP_THRESHOLDS
) -> FrameScores:
    """Score predicted labels of one 2D or 3D frame against its ground-truth labels."""
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    check_same_shape(truth.shape, pred.shape)
    if truth.ndim not in (2, 3):
        raise UserInputError(
            f"labels have {truth.ndim} dimensions, expected a 2D or 3D frame",
            "score one frame (one time point) at a time",
        )
    return score_table(overlap_table(truth, pred), thresholds)


def combine(frames: Sequence[FrameScores]) -> FrameScores:
    """Pool frame scores: sum TP/FP/FN (and SEG Jaccards) over frames, then take the ratios."""
    frames = list(frames)
    if not frames:
        raise ValueError("combine() needs at least one FrameScores")
    thresholds = frames[0].thresholds
    if any(f.thresholds != thresholds for f in frames):
        raise ValueError("all frames must be scored at the same IoU thresholds")
    tp_at = np.sum([f.tp_at for f in frames], axis=0, dtype=np.int64).reshape(len(thresholds))
    return FrameScores.from_counts(
        n_true=sum(f.n_true for f in frames),
        n_pred=sum(f.n_pred for f in frames),
        tp=sum(f.tp for f in frames),
        seg_sum=math.fsum(f.seg_sum for f in frames),
        thresholds=thresholds,
        tp_at=tp_at.tolist(),
    )
