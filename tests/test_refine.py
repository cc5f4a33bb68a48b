"""``refine``: supervised refinement of a finished run on its own labels, with pseudo-label
hygiene, into labels/refined beside labels/cellulus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import assert_one_line_error, tree_digest
from ome_zarr.writer import write_image as ome_write_image
from ome_zarr.writer import write_labels as ome_write_labels

from cellulus_scale.config import REFINE_PROB_THRESHOLD
from cellulus_scale.io import ome_zarr as ome_io
from cellulus_scale.kernels.normalisation import Normalisation
from cellulus_scale.kernels.star_convex import doubtful_objects
from cellulus_scale.model.checkpoint import load_checkpoint
from cellulus_scale.model.unet import context
from cellulus_scale.training.crops import (
    LabelledCrops,
    median_object_size,
    outside_frame,
    read_padded_crop,
)
from cellulus_scale.workflows.predict import predict
from cellulus_scale.workflows.refine import refine, student_settings


def test_doubtful_objects_are_those_of_unusual_size_or_shape() -> None:
    labels = np.zeros((64, 64), np.int32)
    labels[4:14, 4:14] = 1  # a square: trusted
    labels[20:30, 20:50] = 2  # a U: two nuclei taken as one (solidity ~0.6)
    labels[22:28, 30:44] = 0
    labels[40:42, 40:42] = 3  # a fragment of 4 pixels
    labels[40:50, 4:14] = 4
    mask = doubtful_objects(labels, (20.0, 400.0), 0.85, margin=2)
    assert set(np.unique(labels[mask])) == {0, 2, 3}
    assert mask[39, 40] and not mask[37, 40]  # the ring of 2 pixels around the fragment
    assert not doubtful_objects(labels, None, None).any()
    assert set(np.unique(labels[doubtful_objects(labels, None, 0.85, 0)])) == {2}


def test_objects_cut_by_the_frame_may_be_small() -> None:
    labels = np.zeros((32, 32), np.int32)
    labels[10:13, 0:3] = 1  # 9 pixels, cut by the frame's border (left of the crop)
    labels[20:23, 20:23] = 2  # 9 pixels inside: a fragment
    outside = np.zeros((36, 36), bool)
    outside[:, :4] = True
    padded = np.pad(labels, ((2, 2), (4, 0)))
    mask = doubtful_objects(padded, (20.0, 400.0), None, margin=0, cut=outside)
    assert set(np.unique(padded[mask])) == {2}
    big = np.pad(np.ones((32, 32), np.int32), ((2, 2), (4, 0)))  # too large, cut or not
    assert doubtful_objects(big, (20.0, 400.0), None, margin=0, cut=outside).sum() == 1024


def test_padded_crops_reflect_the_image_as_prediction_does(simulated_store: Path) -> None:
    image = ome_io.open_image(simulated_store)
    frame = np.asarray(image.canonical()[2, :, 0])  # (C, y, x)
    pads = ((0, 0), (30, 30), (30, 30))
    reflected, zeros = np.pad(frame, pads, mode="reflect"), np.pad(frame, pads)
    inside = np.pad(np.ones(frame.shape[1:], bool), 30)
    for corner in [(-30, -30), (-7, 40), (100, 98), (0, 0), (10, 20)]:
        window = tuple(slice(c + 30, c + 30 + 58) for c in corner)
        crop = read_padded_crop(image, 2, corner, (58, 58))
        assert np.array_equal(crop, reflected[(slice(None), *window)])
        labels = read_padded_crop(image, 2, corner, (58, 58), "constant")
        assert np.array_equal(labels, zeros[(slice(None), *window)])
        assert np.array_equal(outside_frame(image, corner, (58, 58)), ~inside[window])


def test_crops_teach_a_nucleus_cut_by_the_frame_border(tmp_path: Path) -> None:
    """A crop's output region reaches the frame's border, as prediction's blocks do: the only
    nucleus of this image, a half disc cut by the frame's left edge, is taught (cut) even where
    it is smaller than the trusted sizes. Crops held inside the frame could not reach it."""
    side, margin, radius = 108, context(3), 12
    rows, cols = np.indices((side, side))
    nucleus = ((rows - 54) ** 2 + cols**2 <= radius**2).astype(np.uint32)
    rng = np.random.default_rng(0)
    raw = (100 + 800 * nucleus + rng.normal(0, 10, (side, side))).astype(np.uint16)
    root = zarr.open_group(str(tmp_path / "cut.zarr"), mode="w")
    ome_write_image(raw, root, axes="yx")
    ome_write_labels(nucleus, root, name="truth", axes="yx")
    image = ome_io.open_image(tmp_path / "cut.zarr")
    labels = ome_io.open_labels(tmp_path / "cut.zarr", "truth")
    whole_disc = np.pi * radius**2
    crops = LabelledCrops(
        image, labels, side, margin, Normalisation(100, 900), 0, 24, 8,
        trusted_area=(0.75 * whole_disc, 4 * whole_disc),
    )  # fmt: skip
    samples = [crops[index] for index in range(len(crops))]  # a Dataset: no end to iterate
    taught = [float(((prob > 0) & (weight > 0)).sum()) for _, prob, _, weight in samples]
    assert max(taught) > 20  # most of the half disc inside some output region
    for _, probability, distances, weight in samples:
        inside = (probability > 0) & (weight > 0)
        assert torch.all(distances[:, inside].max(dim=0).values <= 2 * radius + 1)


def test_crops_leave_doubtful_objects_out_of_the_loss(simulated_store: Path) -> None:
    """A size range no object fits: every object pixel (and its ring) gets weight 0 and is not
    taught as anything; a range every object fits: the weights of the plain crops."""
    image = ome_io.open_image(simulated_store)
    labels = ome_io.open_labels(simulated_store, "ground_truth")
    margin = context(3)
    typical = median_object_size(labels, (108, 108), seed=0)
    assert 100 < typical < 400  # simulated diameter 16: about 200 px
    plain = LabelledCrops(image, labels, 108, margin, Normalisation(0, 1), 0, 4, 8)
    none = LabelledCrops(
        image, labels, 108, margin, Normalisation(0, 1), 0, 4, 8, trusted_area=(1e6, 2e6)
    )
    every = LabelledCrops(
        image, labels, 108, margin, Normalisation(0, 1), 0, 4, 8, trusted_area=(1, 1e6)
    )
    for index in range(4):
        _, probability, _, weight = plain[index]
        _, _, _, dropped = none[index]
        _, _, _, kept = every[index]
        assert torch.equal(weight, kept)
        assert torch.all(dropped[probability > 0] == 0)
        assert dropped.sum() < weight.sum()


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory, simulated_store: Path) -> Path:
    """A finished predict output (the watershed stands in for a trained OCE model: refine
    learns from whatever labels/cellulus holds)."""
    out = tmp_path_factory.mktemp("refine") / "out.zarr"
    predict(simulated_store, out, method="watershed", diameter=16, workers=1, progress=False)
    return out


def test_refine_writes_labels_refined_beside_the_run_s_own(
    run_cli, predicted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    shutil.copytree(predicted, out)
    before = {
        name: digest
        for name, digest in tree_digest(out).items()
        if not name.startswith("labels/") and name != ".zattrs"
    }
    teacher = tree_digest(out / "labels" / "cellulus")
    result = run_cli("refine", out, "--train-minutes", "0.1", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "labels/refined" in result.stdout
    # the image copy and the teacher's labels are untouched; the model is kept
    after = tree_digest(out)
    assert all(after[name] == digest for name, digest in before.items())
    assert tree_digest(out / "labels" / "cellulus") == teacher
    checkpoint = load_checkpoint(out / "refined.pt", kind="stardist")
    assert checkpoint.train_config["trusted_solidity"] is not None
    # the cpu student on StarDist's grid of 2 (nuclei of 16 px), its crops fitted to the frames
    assert checkpoint.model_config.grid == 2 and checkpoint.train_config["crop_size"] == 128
    # labels/refined: complete, listed beside labels/cellulus, on the image's grid
    labels_group = json.loads((out / "labels" / ".zattrs").read_text())
    assert labels_group["labels"] == ["cellulus", "refined"]
    refined = ome_io.open_labels(out, "refined")
    assert refined.data.shape == ome_io.open_labels(out, "cellulus").data.shape
    record = zarr.open_group(str(out / "labels" / "refined"), mode="r").attrs
    assert record["cellulus_scale"]["status"] == "complete"
    assert record["cellulus_scale"]["diameter"] == 16
    segmentation = record["cellulus_scale"]["plan"]["segmentation"]
    assert segmentation["prob_threshold"] == REFINE_PROB_THRESHOLD != 0.5  # refine's own
    assert ome_io.run_status(out)["status"] == "complete"
    # a second refine refuses to replace them without --overwrite
    again = run_cli("refine", out, "--train-minutes", "0.1", "--workers", "1")
    assert_one_line_error(again, "labels/refined", "--overwrite")


def test_refine_refuses_what_is_not_a_finished_run(
    run_cli, simulated_store: Path, tmp_path: Path
) -> None:
    for store, words in (
        (simulated_store, ["not a finished predict output", "predict"]),
        (tmp_path / "missing.zarr", ["does not exist"]),
    ):
        before = tree_digest(simulated_store)
        assert_one_line_error(run_cli("refine", store), *words)
        assert tree_digest(simulated_store) == before


def test_resume_reuses_the_finished_model(predicted: Path, tmp_path: Path) -> None:
    """A refinement stopped after its training resumes with that model (no more training) and
    writes labels/refined; the labels equal those of predicting with the model by hand."""
    out = tmp_path / "out.zarr"
    shutil.copytree(predicted, out)
    first = refine(out, train_minutes=0.05, workers=1, progress=False)
    assert first.training is not None and first.training.steps > 0
    expected = ome_io.open_labels(out, "refined").data.compute()
    shutil.rmtree(out / "labels" / "refined")  # as if stopped before the prediction
    labels_attrs = out / "labels" / ".zattrs"
    listed = json.loads(labels_attrs.read_text())
    listed["labels"] = ["cellulus"]
    labels_attrs.write_text(json.dumps(listed))
    stamp = (out / "refined.pt").stat().st_mtime_ns
    again = refine(out, train_minutes=0.05, workers=1, progress=False, resume=True)
    assert again.training is None and (out / "refined.pt").stat().st_mtime_ns == stamp
    assert np.array_equal(ome_io.open_labels(out, "refined").data.compute(), expected)


def test_the_student_segments_narrow_objects_without_a_grid(predicted: Path) -> None:
    """Objects narrower than GRID_MIN_DIAMETER would span fewer than 8 points of a grid of 2."""
    assert student_settings(predicted, "cpu", "cpu", 16.0) == {"crop_size": 128}
    narrow = student_settings(predicted, "cpu", "cpu", 12.0)
    assert narrow == {"grid": 1, "crop_size": 128}
    assert student_settings(predicted, "paper", "cpu", 12.0) == {"crop_size": 124}
