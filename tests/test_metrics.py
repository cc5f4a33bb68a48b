"""Tests for cellulus_scale.evaluation.metrics on hand-built label images with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellulus_scale.errors import UserInputError
from cellulus_scale.evaluation.metrics import (
    AP_THRESHOLDS,
    FrameScores,
    check_same_shape,
    combine,
    match_pairs,
    overlap_table,
    score_frame,
)


def _square(shape, top, left, size=10, value=1, out=None):
    out = np.zeros(shape, np.uint32) if out is None else out
    out[top : top + size, left : left + size] = value
    return out


def _many_objects() -> np.ndarray:
    labels = np.zeros((64, 64), np.uint32)
    for i, (r, c) in enumerate([(2, 2), (2, 30), (30, 2), (30, 30), (45, 45)]):
        labels[r : r + 12, c : c + 15] = i + 1
    return labels


def test_permuted_ids_score_perfectly():
    truth = _many_objects()
    perm = np.array([0, 17, 3, 250, 9, 1000], np.uint32)
    pred = perm[truth]
    s = score_frame(truth, pred)
    assert (s.n_true, s.n_pred, s.tp, s.fp, s.fn) == (5, 5, 5, 0, 0)
    assert s.precision == s.recall == s.f1 == 1.0
    assert s.seg == pytest.approx(1.0)
    assert s.ap == pytest.approx(1.0)
    assert s.tp_at == (5,) * len(AP_THRESHOLDS)


def test_overlap_table_counts():
    truth = _square((30, 30), 5, 5, value=3)
    pred = _square((30, 30), 7, 5, value=9)
    pred[0, 0] = 4  # a one-pixel object touching nothing
    table = overlap_table(truth, pred)
    assert table.true_ids.tolist() == [3]
    assert table.pred_ids.tolist() == [4, 9]
    assert table.true_areas.tolist() == [100]
    assert table.pred_areas.tolist() == [1, 100]
    assert table.rows.tolist() == [0]
    assert table.cols.tolist() == [1]
    assert table.intersections.tolist() == [80]
    assert table.iou() == pytest.approx([80 / 120])
    assert table.to_sparse().toarray().tolist() == [[0, 80]]


def test_shifted_square():
    truth = _square((30, 30), 5, 5)
    pred = _square((30, 30), 7, 5, value=2)  # shifted by 2 px: IoU = 80 / 120
    s = score_frame(truth, pred)
    iou = 80 / 120
    assert (s.tp, s.fp, s.fn) == (1, 0, 0)
    assert s.f1 == 1.0
    # 80 of 100 true pixels are covered (> half), so SEG is the Jaccard index.
    assert s.seg == pytest.approx(iou)
    assert s.seg_sum == pytest.approx(iou)
    # IoU 0.667 passes thresholds 0.50, 0.55, 0.60, 0.65 and fails the other six.
    assert s.tp_at == (1, 1, 1, 1, 0, 0, 0, 0, 0, 0)
    assert s.fp_at == (0, 0, 0, 0, 1, 1, 1, 1, 1, 1)
    assert s.fn_at == s.fp_at
    assert s.ap == pytest.approx(0.4)
    assert s.ap_at.tolist() == [1.0] * 4 + [0.0] * 6


def test_uneven_split():
    truth = _square((20, 20), 0, 0)  # 10 x 10
    pred = np.zeros_like(truth)
    pred[0:10, 0:4] = 5  # 40 px, IoU 0.4
    pred[0:10, 4:10] = 6  # 60 px, IoU 0.6, covers more than half of the true object
    s = score_frame(truth, pred)
    assert (s.tp, s.fp, s.fn) == (1, 1, 0)
    assert s.precision == 0.5 and s.recall == 1.0
    assert s.f1 == pytest.approx(2 / 3)
    assert s.seg == pytest.approx(0.6)
    # Matched at 0.50 and 0.55 only (IoU 0.6 is not > 0.6): AP there is 1 / (1 + 1 + 0).
    assert s.tp_at == (1, 1) + (0,) * 8
    assert s.ap == pytest.approx((0.5 + 0.5) / 10)


def test_even_split_costs_one_fn_and_two_fp():
    truth = _square((20, 20), 0, 0)
    pred = np.zeros_like(truth)
    pred[0:10, 0:5] = 1
    pred[0:10, 5:10] = 2  # both halves: IoU exactly 0.5, covering exactly half
    s = score_frame(truth, pred)
    assert (s.tp, s.fp, s.fn) == (0, 2, 1)
    assert s.f1 == 0.0
    assert s.seg == 0.0  # no prediction covers MORE than half
    assert s.ap == 0.0


def test_empty_prediction():
    truth = _many_objects()
    s = score_frame(truth, np.zeros_like(truth))
    assert (s.n_true, s.n_pred, s.tp, s.fp, s.fn) == (5, 0, 0, 0, 5)
    assert s.precision == s.recall == s.f1 == 0.0
    assert s.seg == 0.0
    assert s.ap == 0.0


def test_empty_truth_with_predictions():
    pred = _many_objects()
    s = score_frame(np.zeros_like(pred), pred)
    assert (s.tp, s.fp, s.fn) == (0, 5, 0)
    assert s.precision == s.recall == s.f1 == 0.0
    assert math.isnan(s.seg)
    assert s.ap == 0.0


def test_both_empty():
    empty = np.zeros((16, 16), np.uint16)
    s = score_frame(empty, empty)
    assert (s.n_true, s.n_pred, s.tp, s.fp, s.fn) == (0, 0, 0, 0, 0)
    assert s.precision == s.recall == s.f1 == 1.0
    assert s.ap == 1.0
    assert math.isnan(s.seg)
    assert s.seg_sum == 0.0


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64, np.int64])
def test_large_ids(dtype):
    big = np.iinfo(dtype).max
    truth = _square((30, 30), 5, 5).astype(dtype) * dtype(big)
    pred = _square((30, 30), 7, 5).astype(dtype) * dtype(big - 7)
    pred[20:25, 20:25] = dtype(12345678901 % big)
    table = overlap_table(truth, pred)
    assert table.true_ids.tolist() == [int(big)]
    assert table.true_ids.dtype == dtype
    s = score_frame(truth, pred)
    assert (s.tp, s.fp, s.fn) == (1, 1, 0)
    assert s.seg == pytest.approx(80 / 120)


def test_bool_labels():
    truth = _square((20, 20), 0, 0).astype(bool)
    s = score_frame(truth, truth)
    assert s.f1 == 1.0 and s.seg == 1.0


def test_float_labels_rejected():
    with pytest.raises(UserInputError):
        score_frame(np.zeros((4, 4)), np.zeros((4, 4), np.uint8))


def test_3d():
    truth = np.zeros((8, 20, 20), np.uint16)
    truth[1:6, 2:12, 2:12] = 1  # 500 voxels
    truth[2:7, 14:19, 14:19] = 2
    pred = np.zeros_like(truth)
    pred[2:7, 2:12, 2:12] = 4  # shifted by one slice: 400 / 600
    s = score_frame(truth, pred)
    assert (s.n_true, s.n_pred, s.tp, s.fp, s.fn) == (2, 1, 1, 0, 1)
    assert s.seg == pytest.approx((400 / 600) / 2)
    assert s.recall == 0.5


def test_combine_pools_counts():
    truth_a = _many_objects()
    pred_a = truth_a.copy()
    pred_a[pred_a == 5] = 0  # one miss
    truth_b = _square((30, 30), 5, 5)
    pred_b = _square((30, 30), 7, 5)
    empty = np.zeros((10, 10), np.uint8)
    frames = [score_frame(truth_a, pred_a), score_frame(truth_b, pred_b)]
    frames.append(score_frame(empty, empty))
    pooled = combine(frames)
    assert pooled.n_true == 6 and pooled.n_pred == 5
    assert (pooled.tp, pooled.fp, pooled.fn) == (5, 0, 1)
    assert pooled.f1 == pytest.approx(10 / 11)
    assert pooled.seg == pytest.approx((4 + 80 / 120) / 6)
    tp_at = np.array([4 + 1] * 4 + [4] * 6)
    assert pooled.tp_at == tuple(tp_at)
    expected_ap = np.mean(tp_at / (tp_at + (5 - tp_at) + (6 - tp_at)))
    assert pooled.ap == pytest.approx(expected_ap)
    # A single frame combined with nothing else is unchanged.
    assert combine(frames[:1]) == frames[0]


def test_combine_all_empty_and_none():
    empty = np.zeros((10, 10), np.uint8)
    pooled = combine([score_frame(empty, empty)] * 3)
    assert pooled.f1 == 1.0 and math.isnan(pooled.seg)
    with pytest.raises(ValueError):
        combine([])


def test_from_counts_matches_frame():
    truth = _square((30, 30), 5, 5)
    pred = _square((30, 30), 7, 5)
    s = score_frame(truth, pred)
    again = FrameScores.from_counts(s.n_true, s.n_pred, s.tp, s.seg_sum, s.thresholds, s.tp_at)
    assert again == s
    row = s.as_dict()
    assert row["f1"] == 1.0 and row["ap@0.65"] == 1.0 and row["ap@0.70"] == 0.0


def test_low_threshold_maximises_matches():
    # Greedy by IoU would pair A with Y (0.44) and leave X and B unmatched.
    truth = np.zeros((10, 20), np.uint8)
    truth[:, 0:10] = 1  # A
    truth[:, 10:20] = 2  # B
    pred = np.zeros_like(truth)
    pred[:, 0:3] = 1  # X: IoU with A 0.3
    pred[:, 3:16] = 2  # Y: IoU with A 70/160, with B 60/170
    table = overlap_table(truth, pred)
    rows, cols = match_pairs(table, 0.25)
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (1, 1)]
    rows, cols = match_pairs(table, 0.4)
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 1)]
    s = score_frame(truth, pred, thresholds=(0.25, 0.5))
    assert s.tp_at == (2, 0)


def test_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        truth = np.zeros((48, 48), np.uint32)
        pred = np.zeros_like(truth)
        for labels in (truth, pred):
            for obj in range(1, 12):
                r, c = rng.integers(0, 40, 2)
                h, w = rng.integers(3, 12, 2)
                labels[r : r + h, c : c + w] = obj * 1000
        t_ids = [i for i in np.unique(truth) if i]
        p_ids = [i for i in np.unique(pred) if i]
        iou = np.zeros((len(t_ids), len(p_ids)))
        for i, t in enumerate(t_ids):
            for j, p in enumerate(p_ids):
                a, b = truth == t, pred == p
                iou[i, j] = (a & b).sum() / (a | b).sum()
        seg = 0.0
        for i, t in enumerate(t_ids):
            a = truth == t
            for j, p in enumerate(p_ids):
                if ((pred == p) & a).sum() > 0.5 * a.sum():
                    seg += iou[i, j]
        s = score_frame(truth, pred)
        assert s.tp == int((iou > 0.5).sum())
        assert s.tp_at == tuple(int((iou > t).sum()) for t in AP_THRESHOLDS)
        assert s.seg == pytest.approx(seg / len(t_ids))


def test_shape_mismatch():
    with pytest.raises(UserInputError) as info:
        check_same_shape((10, 12), (10, 11))
    assert "prediction shape (10, 11) differs from ground-truth shape (10, 12)" in str(info.value)
    assert info.value.fix == "evaluate labels of the same image"
    with pytest.raises(UserInputError):
        score_frame(np.zeros((5, 5), np.uint8), np.zeros((5, 6), np.uint8))
    with pytest.raises(UserInputError):
        overlap_table(np.zeros((5, 5), np.uint8), np.zeros((5, 5, 1), np.uint8))
    check_same_shape((3, 4), [3, 4])


def test_wrong_dimensionality():
    with pytest.raises(UserInputError):
        score_frame(np.zeros((2, 3, 4, 5), np.uint8), np.zeros((2, 3, 4, 5), np.uint8))
