"""Supervised refinement (Appendix B): StarDist geometry, training, blockwise prediction."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from cellulus_scale.cli.main import main as cli
from click.testing import CliRunner
from distributed import Client, LocalCluster

from cellulus_scale import ome_io
from cellulus_scale.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cellulus_scale.config import ModelConfig
from cellulus_scale.data import LabelledCrops, Normalisation
from cellulus_scale.errors import UserInputError
from cellulus_scale.metrics import match_pairs, overlap_table
from cellulus_scale.model import UNet, context
from cellulus_scale.predict import predict
from cellulus_scale.simulate import SimulationSpec
from cellulus_scale.star_convex import (
    object_probability,
    polygons_to_labels,
    render_polygons,
    star_distances,
    suppress,
    touching_border,
)
from cellulus_scale.synthetic import write_simulation
from cellulus_scale.train_supervised import train_supervised

SHAPE = (200, 232)  # 96 and 128 do not divide it
#: Tiny settings for checks of the machinery (not of accuracy).
TINY = {
    "preset": "cpu",
    "feature_maps": 2,
    "crop_size": 108,  # 20x20 output for the depth-3 network
    "batch_size": 1,
    "min_crops_per_epoch": 3,
    "num_workers": 0,
    "n_rays": 8,
    "progress": False,
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def f1_at(truth: np.ndarray, pred: np.ndarray, threshold: float) -> float:
    table = overlap_table(truth, pred)
    matched = len(match_pairs(table, threshold)[0])
    total = table.n_true + table.n_pred
    return 1.0 if total == 0 else 2 * matched / total


# --- geometry -------------------------------------------------------------------------------


def test_star_distances_of_a_disc_are_its_radius_and_render_back_to_it() -> None:
    radius = 15
    labels = disc((64, 64), (32, 30), radius).astype(np.uint32) * 70_000  # > uint16 IDs too
    distances = star_distances(labels, 32)
    assert distances.shape == (32, 64, 64)
    assert np.all(np.abs(distances[:, 32, 30] - radius) <= 1.0)
    assert np.all(distances[:, labels == 0] == 0)
    rendered = polygons_to_labels(
        np.array([[32, 30]]), distances[:, 32, 30][None], np.ones(1), labels.shape
    )
    assert iou(rendered > 0, labels > 0) > 0.9
    probability = object_probability(labels)
    assert probability[32, 30] == pytest.approx(1.0) and probability[0, 0] == 0
    assert 0 < probability[32, 30 - radius] < 0.2


def test_suppression_keeps_one_of_two_overlapping_candidates() -> None:
    points = np.array([[32, 30], [33, 31], [10, 50]])
    distances = np.array([[15.0] * 32, [14.0] * 32, [5.0] * 32])
    kept = suppress(points, np.array([0.8, 0.9, 0.7]), distances, 0.4)
    assert list(kept) == [1, 2]  # the more probable of the pair, and the distant one
    # equal probabilities: the order is fixed by position, whatever the input order
    same = np.array([0.9, 0.9, 0.7])
    assert list(points[suppress(points, same, distances, 0.4)][:, 0]) == [32, 10]
    flipped = suppress(points[::-1], same[::-1], distances[::-1], 0.4)
    assert list(points[::-1][flipped][:, 0]) == [32, 10]


def test_rendering_is_the_same_in_any_window() -> None:
    rng = np.random.default_rng(0)
    points = rng.integers(10, 90, size=(12, 2))
    distances = rng.uniform(3, 12, size=(12, 16))
    probs = rng.uniform(0.5, 1, size=12)
    ids = np.arange(101, 113)
    whole = render_polygons(points, distances, probs, ids, (slice(0, 100), slice(0, 100)))
    part = render_polygons(points, distances, probs, ids, (slice(37, 71), slice(20, 95)))
    assert np.array_equal(whole[37:71, 20:95], part)
    assert len(np.unique(whole)) > 5


def test_crops_carry_targets_and_ignore_cut_objects(simulated_store: Path) -> None:
    image = ome_io.open_image(simulated_store)
    labels = ome_io.open_labels(simulated_store, "ground_truth")
    margin = context(3)
    crops = LabelledCrops(image, labels, 108, margin, Normalisation(0, 1), 0, 4, 8)
    crop, probability, distances, weight = crops[0]
    assert crop.shape == (1, 108, 108)
    assert probability.shape == weight.shape == (20, 20) and distances.shape == (8, 20, 20)
    assert torch.all((probability >= 0) & (probability <= 1))
    grid = np.zeros((9, 9), np.uint32)
    grid[0:3, 0:3] = 1  # touches the border: cut
    grid[4:7, 4:7] = 2
    cut = touching_border(grid)
    assert cut[1, 1] and not cut[5, 5] and not cut[8, 8]


# --- training -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("supervised")


@pytest.fixture(scope="module")
def video(workdir: Path) -> Path:
    return write_simulation(workdir / "video.zarr", SimulationSpec(frames=2, shape=SHAPE, seed=3))


@pytest.fixture(scope="module")
def model(workdir: Path, video: Path) -> Path:
    """The cpu preset, briefly, on the simulator's ground truth."""
    path = workdir / "model_sd.pt"
    result = train_supervised(
        video,
        path,
        labels="ground_truth",
        preset="cpu",
        epochs=1,
        min_crops_per_epoch=320,
        num_workers=0,
        progress=False,
    )
    assert result.steps == 80
    return path


def test_training_writes_a_stardist_checkpoint_log_and_plot(model: Path) -> None:
    checkpoint = load_checkpoint(model, kind="stardist")
    assert checkpoint.model_config.depth == 3
    assert checkpoint.model_config.outputs == 1 + 32
    assert checkpoint.train_config["labels"] == "ground_truth"
    assert checkpoint.train_config["lr_milestones"] == [6, 8]
    with model.with_suffix(".loss.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, 81))
    assert {"prob", "dist"} <= set(rows[0])
    early = np.mean([float(r["loss"]) for r in rows[:10]])
    late = np.mean([float(r["loss"]) for r in rows[-10:]])
    assert late < early, "the loss should fall"
    assert model.with_suffix(".loss.png").stat().st_size > 0


def test_resume_after_an_epoch_stop_is_exact(simulated_store: Path, tmp_path: Path) -> None:
    full, split = tmp_path / "full.pt", tmp_path / "split.pt"
    train_supervised(simulated_store, full, labels="ground_truth", epochs=2, **TINY)
    first = train_supervised(simulated_store, split, labels="ground_truth", epochs=1, **TINY)
    assert first.steps == 6  # 4 frames of 128x128 in 108x108 crops: 6 crops an epoch
    resumed = train_supervised(simulated_store, split, epochs=2, resume=True, progress=False)
    assert resumed.steps == 12
    a, b = load_checkpoint(full).state_dict, load_checkpoint(split).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserInputError, match="no label image named 'other'"):
        train_supervised(simulated_store, split, labels="other", resume=True, progress=False)


# --- blockwise prediction --------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    )
    with Client(cluster) as dask:
        yield dask
    cluster.close()


def test_labels_do_not_depend_on_block_size(
    video: Path, model: Path, workdir: Path, client: Client
) -> None:
    results = {}
    for size in (96, 128):
        out = workdir / f"sd_{size}.zarr"
        result = predict(
            video, out, model, diameter=24, block_size=size, client=client, progress=False
        )
        assert result.recomputed == {"candidates": result.blocks, "labels": result.blocks}
        assert ome_io.run_status(out)["status"] == "complete"
        results[size] = ome_io.open_labels(out, "cellulus").data.compute()
    assert len(np.unique(results[96])) > 10
    for frame in range(results[96].shape[0]):
        assert f1_at(results[128][frame], results[96][frame], 0.9) >= 0.99
    # IDs are unique over the video
    assert not set(np.unique(results[96][0])[1:]) & set(np.unique(results[96][1])[1:])


def test_resume_finishes_an_interrupted_run_identically(
    video: Path, model: Path, workdir: Path, client: Client
) -> None:
    out = workdir / "sd_resume.zarr"
    predict(video, out, model, diameter=24, block_size=128, client=client, progress=False)
    reference = ome_io.open_labels(out, "cellulus").data.compute()
    shutil.rmtree(out)
    # interrupt: stop after the candidates of some blocks by failing the labels stage
    predict_args = {"diameter": 24, "block_size": 128, "client": client, "progress": False}
    from cellulus_scale import predict_stardist

    original = predict_stardist.labels_task

    def failing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    predict_stardist.labels_task = failing  # type: ignore[assignment]
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            predict(video, out, model, **predict_args)
    finally:
        predict_stardist.labels_task = original
    assert ome_io.run_status(out)["status"] == "incomplete"
    result = predict(video, out, model, resume=True, **predict_args)
    assert result.recomputed["candidates"] == 0
    assert np.array_equal(ome_io.open_labels(out, "cellulus").data.compute(), reference)


# --- command line ---------------------------------------------------------------------------


def invoke(runner: CliRunner, *args: object) -> tuple[int, list[str], str]:
    result = runner.invoke(cli, list(map(str, args)))
    assert "Traceback" not in (result.stderr + result.stdout)
    return result.exit_code, result.stderr.strip().splitlines(), result.stdout


def test_cli_trains_on_a_predict_output_and_predicts_with_it(
    cli_runner: CliRunner, simulated_store: Path, tmp_path: Path
) -> None:
    """The typical call: train-supervised on Cellulus' own output store, --labels cellulus
    (a watershed run through the same machinery stands in for a trained OCE model here)."""
    out = tmp_path / "out.zarr"
    code, lines, _ = invoke(
        cli_runner,
        "predict",
        simulated_store,
        out,
        "--method",
        "watershed",
        "--diameter",
        16,
        "--workers",
        1,
    )
    assert code == 0, lines
    model = tmp_path / "model_sd.pt"
    code, lines, stdout = invoke(
        cli_runner,
        "train-supervised",
        out,
        model,
        "--labels",
        "cellulus",
        "--preset",
        "cpu",
        "--crop-size",
        108,
        "--feature-maps",
        2,
        "--num-workers",
        0,
        "--max-minutes",
        0.05,
    )
    assert code == 0, lines
    assert "wrote" in stdout and load_checkpoint(model, kind="stardist")
    refined = tmp_path / "refined.zarr"
    code, lines, stdout = invoke(
        cli_runner, "predict", out, refined, "--model", model, "--diameter", 16, "--workers", 1
    )
    assert code == 0, lines
    assert "candidates" in stdout and ome_io.run_status(refined)["status"] == "complete"


@pytest.fixture
def oce_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "oce.pt"
    config = ModelConfig(feature_maps=2)
    checkpoint = Checkpoint(
        "oce", config, Normalisation(0, 1), UNet(config).state_dict(), "tyx", {}, {}
    )
    save_checkpoint(checkpoint, path)
    return path


def test_cli_bad_input(
    cli_runner: CliRunner, simulated_store: Path, tmp_path: Path, oce_checkpoint: Path
) -> None:
    model = tmp_path / "m.pt"
    cases = [
        (["--labels", "nope"], ["no label image named 'nope'", "ground_truth"]),
        ([], ["--labels is missing"]),
        (["--labels", "ground_truth", "--resume"], ["no checkpoint"]),
    ]
    for extra, words in cases:
        code, lines, _ = invoke(cli_runner, "train-supervised", simulated_store, model, *extra)
        assert code == 2 and len(lines) == 1, lines
        assert all(w in lines[0] for w in words), lines[0]

    # labels of another shape
    store = tmp_path / "copy.zarr"
    shutil.copytree(simulated_store, store)
    root = ome_io.open_group_for_update(store)
    ome_io.write_labels(root, "small", da.zeros((4, 64, 64), np.uint32), "tyx", (1, 1, 1))
    code, lines, _ = invoke(cli_runner, "train-supervised", store, model, "--labels", "small")
    assert code == 2 and len(lines) == 1 and "'small' have shape 4x64x64" in lines[0]

    # an OCE checkpoint to --resume
    code, lines, _ = invoke(
        cli_runner,
        "train-supervised",
        simulated_store,
        oce_checkpoint,
        "--labels",
        "ground_truth",
        "--resume",
    )
    assert code == 2 and len(lines) == 1
    assert "'oce' model, but a 'stardist' model is needed" in lines[0]

    # 3D is not implemented: refused in one line
    volume = tmp_path / "volume.zarr"
    zarr.open_array(str(volume), mode="w", shape=(1, 4, 128, 128), dtype=np.uint8)[:] = 1
    code, lines, _ = invoke(
        cli_runner, "train-supervised", volume, model, "--labels", "x", "--axes", "tzyx"
    )
    assert code == 2 and len(lines) == 1 and "2D images only" in lines[0]
    assert not model.exists()
