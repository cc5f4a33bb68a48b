"""Tests for store evaluation (cellulus_scale.evaluation.evaluate) and frame previews (snapshot)."""

from __future__ import annotations

import csv
import json
import math

import dask.array as da
import numpy as np
import pytest
from matplotlib.image import imread

from cellulus_scale.errors import UserInputError
from cellulus_scale.evaluation.evaluate import EvaluationReport, evaluate
from cellulus_scale.io import ome_zarr as ome_io
from cellulus_scale.viz.snapshot import preview_frame

SQUARES = (
    (slice(5, 20), slice(5, 20)),
    (slice(30, 45), slice(10, 25)),
    (slice(40, 60), slice(40, 60)),
)


def _truth(n_frames=3, shape=(64, 64), empty_last=True) -> np.ndarray:
    """3 squares in every frame (IDs 1, 2, 3), the last frame empty if ``empty_last``."""
    labels = np.zeros((n_frames, *shape), np.uint32)
    for t in range(n_frames):
        for k, region in enumerate(SQUARES, start=1):
            labels[(t, *region)] = k
    if empty_last:
        labels[-1] = 0
    return labels


def _store(path, labels: dict[str, np.ndarray], axes="tyx", image=None):
    """An image store with label images; axes 'tcyx' gives the labels a channel axis of 1."""
    first = next(iter(labels.values()))
    if image is None:
        image = (first > 0).astype(np.float32) * 100.0 + 10.0
        if "c" in axes and image.ndim == len(axes) - 1:
            image = image[:, None]
    group = ome_io.create_group(path)
    chunks = (1,) + image.shape[1:]
    ome_io.write_image(group, da.from_array(image, chunks=chunks), axes, (1.0,) * len(axes), "img")
    for name, values in labels.items():
        values = values[:, None] if "c" in axes and values.ndim == len(axes) - 1 else values
        ome_io.write_labels(
            group,
            name,
            da.from_array(values, chunks=(1,) + values.shape[1:]),
            axes,
            (1.0,) * len(axes),
        )
    return group


def test_identical_labels_with_permuted_ids(tmp_path):
    truth = _truth(empty_last=False)
    pred = np.zeros_like(truth)
    for old, new in ((1, 70000), (2, 5), (3, 1)):
        pred[truth == old] = new
    _store(tmp_path / "a.zarr", {"ground_truth": truth, "cellulus": pred}, axes="tcyx")
    report = evaluate(tmp_path / "a.zarr")
    assert isinstance(report, EvaluationReport)
    assert len(report.frames) == 3
    assert report.overall.f1 == 1.0
    assert report.overall.seg == 1.0
    assert report.overall.ap == 1.0
    assert (report.overall.n_true, report.overall.tp) == (9, 9)


def test_missing_object_and_empty_frame(tmp_path):
    truth = _truth()
    pred = truth.copy()
    pred[1][pred[1] == 2] = 0  # frame 1 misses object 2
    _store(tmp_path / "a.zarr", {"ground_truth": truth, "cellulus": pred})
    report = evaluate(tmp_path / "a.zarr")
    f0, f1, f2 = report.frames
    assert (f0.n_true, f0.n_pred, f0.tp, f0.fp, f0.fn) == (3, 3, 3, 0, 0)
    assert (f1.n_true, f1.n_pred, f1.tp, f1.fp, f1.fn) == (3, 2, 2, 0, 1)
    assert f1.precision == 1.0
    assert f1.recall == pytest.approx(2 / 3)
    assert f1.f1 == pytest.approx(0.8)
    assert f1.seg == pytest.approx(2 / 3)
    assert f1.ap == pytest.approx(2 / 3)
    # Frame 2 has no objects in either image.
    assert (f2.n_true, f2.n_pred, f2.tp) == (0, 0, 0)
    assert f2.f1 == 1.0 and f2.ap == 1.0 and math.isnan(f2.seg)
    overall = report.overall
    assert (overall.n_true, overall.n_pred, overall.tp, overall.fp, overall.fn) == (6, 5, 5, 0, 1)
    assert overall.f1 == pytest.approx(10 / 11)
    assert overall.seg == pytest.approx(5 / 6)
    assert overall.ap == pytest.approx(5 / 6)


def test_truth_in_other_store_with_other_axes(tmp_path):
    truth = _truth()
    _store(tmp_path / "pred.zarr", {"cellulus": truth}, axes="tcyx")
    _store(tmp_path / "truth.zarr", {"gt": truth}, axes="tyx")
    report = evaluate(tmp_path / "pred.zarr", tmp_path / "truth.zarr", truth_labels="gt")
    assert report.overall.f1 == 1.0
    assert report.truth_path == tmp_path / "truth.zarr"
    assert report.truth_labels == "gt"


def test_3d_frames(tmp_path):
    truth = np.zeros((2, 4, 32, 32), np.uint16)
    truth[:, 1:3, 4:12, 4:12] = 1
    truth[0, :, 20:30, 20:30] = 2
    pred = truth.copy()
    pred[1] = 0
    _store(tmp_path / "a.zarr", {"ground_truth": truth, "cellulus": pred}, axes="tzyx")
    report = evaluate(tmp_path / "a.zarr")
    assert (report.frames[0].n_true, report.frames[0].tp) == (2, 2)
    assert (report.frames[1].n_true, report.frames[1].n_pred, report.frames[1].fn) == (1, 0, 1)
    assert report.overall.f1 == pytest.approx(2 * 2 / (2 * 2 + 1))


def test_mismatched_shapes(tmp_path):
    _store(tmp_path / "pred.zarr", {"cellulus": _truth()})
    _store(tmp_path / "truth.zarr", {"ground_truth": _truth(shape=(64, 60))})
    with pytest.raises(UserInputError, match="differ"):
        evaluate(tmp_path / "pred.zarr", tmp_path / "truth.zarr")
    _store(tmp_path / "short.zarr", {"ground_truth": _truth(n_frames=2)})
    with pytest.raises(UserInputError, match="t: 2 vs 3"):
        evaluate(tmp_path / "pred.zarr", tmp_path / "short.zarr")


def test_several_channels_refused(tmp_path):
    labels = np.stack([_truth(), _truth()], axis=1)  # (t, c=2, y, x)
    _store(tmp_path / "a.zarr", {"ground_truth": labels, "cellulus": labels}, axes="tcyx")
    with pytest.raises(UserInputError, match="2 channels"):
        evaluate(tmp_path / "a.zarr")


def test_missing_label_name(tmp_path):
    _store(tmp_path / "a.zarr", {"cellulus": _truth()})
    with pytest.raises(UserInputError, match="ground_truth"):
        evaluate(tmp_path / "a.zarr")


@pytest.mark.parametrize("which", ["pred", "truth"])
def test_incomplete_store_refused(tmp_path, which):
    stores = {
        "pred": _store(tmp_path / "pred.zarr", {"cellulus": _truth()}),
        "truth": _store(tmp_path / "truth.zarr", {"ground_truth": _truth()}),
    }
    ome_io.mark_status(stores[which], "incomplete", command="predict")
    with pytest.raises(UserInputError, match="--resume") as info:
        evaluate(tmp_path / "pred.zarr", tmp_path / "truth.zarr")
    assert f"{which}.zarr" in str(info.value)


def test_reports_written(tmp_path):
    truth = _truth()
    pred = truth.copy()
    pred[1][pred[1] == 2] = 0
    _store(tmp_path / "a.zarr", {"ground_truth": truth, "cellulus": pred})
    report = evaluate(tmp_path / "a.zarr")

    table = report.table()
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["frame", "n_true", "n_pred"]
    assert len(lines) == 2 + 3 + 1  # header, rule, 3 frames, "all"
    assert lines[-1].split()[0] == "all"
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert "all" in str(report)

    data = json.loads(report.to_json(tmp_path / "scores.json").read_text())
    assert data["overall"]["tp"] == 5
    assert data["overall"]["f1"] == pytest.approx(10 / 11)
    assert [f["frame"] for f in data["frames"]] == [0, 1, 2]
    assert data["frames"][2]["seg"] is None  # NaN written as null
    assert data["prediction"]["labels"] == "cellulus"
    assert data["truth"]["labels"] == "ground_truth"

    with report.to_csv(tmp_path / "scores.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["frame"] for r in rows] == ["0", "1", "2", "all"]
    assert int(rows[1]["fn"]) == 1
    assert float(rows[-1]["f1"]) == pytest.approx(10 / 11)
    assert rows[2]["seg"] == ""
    assert float(rows[0]["ap@0.50"]) == 1.0


def test_evaluate_with_distributed_client(tmp_path):
    distributed = pytest.importorskip("distributed")
    truth = _truth()
    _store(tmp_path / "a.zarr", {"ground_truth": truth, "cellulus": truth})
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as client:
        report = evaluate(tmp_path / "a.zarr", client=client)
    assert report.overall.f1 == 1.0


# --- preview_frame --------------------------------------------------------------------------


def test_preview_frame_writes_png(tmp_path):
    truth = _truth(shape=(64, 80))
    _store(tmp_path / "a.zarr", {"cellulus": truth}, axes="tcyx")
    out = preview_frame(tmp_path / "a.zarr", 1, tmp_path / "frame.png")
    assert out == tmp_path / "frame.png" and out.exists()
    png = imread(out)
    # 64 x 80 is enlarged 9x (long side to at least 768 px) under a 24 px title band.
    assert png.shape[:2] == (64 * 9 + 24, 80 * 9)


def test_preview_frame_shows_the_ground_truth_beside(tmp_path):
    truth = _truth(shape=(64, 80))
    _store(tmp_path / "a.zarr", {"cellulus": truth, "ground_truth": truth})
    png = imread(preview_frame(tmp_path / "a.zarr", 0, tmp_path / "both.png"))
    assert png.shape[:2] == (64 * 9 + 24, 2 * 80 * 9 + 8)
    _store(tmp_path / "b.zarr", {"cellulus": truth})  # the truth of another store
    png = imread(
        preview_frame(tmp_path / "b.zarr", 0, tmp_path / "b.png", truth=tmp_path / "a.zarr")
    )
    assert png.shape[:2] == (64 * 9 + 24, 2 * 80 * 9 + 8)


def test_preview_frame_3d(tmp_path):
    truth = np.zeros((2, 5, 300, 260), np.uint16)
    truth[:, :, 50:150, 50:150] = 4
    _store(tmp_path / "a.zarr", {"seg": truth}, axes="tzyx")
    out = preview_frame(tmp_path / "a.zarr", 0, tmp_path / "z.png", labels="seg")
    assert imread(out).shape[:2] == (2 * 300 + 24, 2 * 260)


def test_preview_frame_refusals(tmp_path):
    group = _store(tmp_path / "a.zarr", {"cellulus": _truth()})
    with pytest.raises(UserInputError, match="from 0 to 2"):
        preview_frame(tmp_path / "a.zarr", 3, tmp_path / "x.png")
    with pytest.raises(UserInputError, match="from 0 to 2"):
        preview_frame(tmp_path / "a.zarr", -1, tmp_path / "x.png")
    with pytest.raises(UserInputError, match="channel"):
        preview_frame(tmp_path / "a.zarr", 0, tmp_path / "x.png", channel=1)
    with pytest.raises(UserInputError, match="no label image named 'other'"):
        preview_frame(tmp_path / "a.zarr", 0, tmp_path / "x.png", labels="other")
    with pytest.raises(UserInputError, match="does not exist"):
        preview_frame(tmp_path / "a.zarr", 0, tmp_path / "missing" / "x.png")
    ome_io.mark_status(group, "incomplete", command="predict")
    with pytest.raises(UserInputError, match="--resume"):
        preview_frame(tmp_path / "a.zarr", 0, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
