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
from cellulus_scale.cli.main import main as cli
from click.testing import CliRunner
from distributed import Client
from skimage.segmentation import expand_labels

from cellulus_scale.config import ModelConfig
from cellulus_scale.errors import UserInputError
from cellulus_scale.evaluation.metrics import (
    combine,
    match_pairs,
    overlap_table,
    score_frame,
)
from cellulus_scale.io import ome_zarr as ome_io
from cellulus_scale.kernels.normalisation import Normalisation
from cellulus_scale.kernels.star_convex import (
    object_probability,
    polygons_to_labels,
    render_polygons,
    star_distances,
    suppress,
    touching_border,
)
from cellulus_scale.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cellulus_scale.model.unet import (
    UNet,
    context,
    output_size,
    pooling_step,
    smallest_valid_size_at_least,
)
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training import loop
from cellulus_scale.training.crops import LabelledCrops
from cellulus_scale.training.stardist import train_supervised
from cellulus_scale.workflows.predict import predict

SHAPE = (200, 232)  # 96 and 128 do not divide it
#: Tiny settings for checks of the machinery (not of accuracy).
TINY = {
    "preset": "cpu",
    "feature_maps": 2,
    "crop_size": 112,  # 16x16 output points for the cpu preset's depth-2 network on a grid of 2
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


def ball(shape: tuple[int, ...], centre: tuple[int, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def test_3d_star_distances_of_a_ball_are_its_radius_and_render_back_to_it() -> None:
    radius, centre = 10, (20, 19, 21)
    labels = ball((40, 40, 40), centre, radius).astype(np.uint32) * 70_000
    distances = star_distances(labels)  # 96 rays on a sphere by default in 3D
    assert distances.shape == (96, 40, 40, 40)
    assert np.all(np.abs(distances[(slice(None), *centre)] - radius) <= 2.0)
    assert np.all(distances[:, labels == 0] == 0)
    rendered = polygons_to_labels(
        np.array([centre]), distances[(slice(None), *centre)][None], np.ones(1), labels.shape
    )
    assert iou(rendered > 0, labels > 0) > 0.8
    probability = object_probability(labels)
    assert probability[centre] == pytest.approx(1.0) and probability[0, 0, 0] == 0


def test_3d_suppression_keeps_one_of_two_overlapping_candidates() -> None:
    points = np.array([[20, 20, 20], [21, 21, 21], [5, 5, 30]])
    distances = np.array([[8.0] * 96, [7.0] * 96, [3.0] * 96])
    assert list(suppress(points, np.array([0.8, 0.9, 0.7]), distances, 0.4)) == [1, 2]
    same = np.array([0.9, 0.9, 0.7])  # ties: the order is fixed by position
    assert list(points[suppress(points, same, distances, 0.4)][:, 0]) == [20, 5]
    flipped = suppress(points[::-1], same[::-1], distances[::-1], 0.4)
    assert list(points[::-1][flipped][:, 0]) == [20, 5]


@pytest.mark.parametrize("anisotropy", [None, (3.0, 1.0, 1.0)])
def test_3d_rendering_is_the_same_in_any_window(anisotropy: tuple[float, ...] | None) -> None:
    rng = np.random.default_rng(1)
    points = rng.integers(0, 50, size=(60, 3))
    distances = rng.uniform(2, 7, size=(60, 24))
    probs = rng.uniform(0.5, 1, size=60)
    ids = np.arange(101, 161)
    whole = render_polygons(
        points, distances, probs, ids, (slice(0, 50),) * 3, anisotropy=anisotropy
    )
    window = (slice(7, 33), slice(20, 50), slice(3, 41))
    part = render_polygons(points, distances, probs, ids, window, anisotropy=anisotropy)
    assert np.array_equal(whole[window], part)
    assert len(np.unique(whole)) > 20


def test_3d_rays_spread_evenly_in_physical_space_outline_flat_nuclei() -> None:
    """Planes 4 px apart: a nucleus is 4 times flatter in voxels than in space. Rays spread
    evenly in physical space (StarDist's anisotropy) outline it far better than rays even in
    voxels, most of which then point steeply up or down and end within a plane or two."""
    rng = np.random.default_rng(0)
    scores: dict[tuple[float, ...] | None, list[float]] = {None: [], (4.0, 1.0, 1.0): []}
    zz, yy, xx = np.indices((24, 48, 48))
    for _ in range(4):
        rz, ry, rx = rng.uniform(7, 14, 3)  # semi-axes in in-plane pixels
        inside = ((zz * 4 - 48) / rz) ** 2 + ((yy - 24) / ry) ** 2 + ((xx - 24) / rx) ** 2 <= 1
        for rays in scores:
            lengths = star_distances(inside.astype(np.uint16), 96, anisotropy=rays)[:, 12, 24, 24]
            drawn = polygons_to_labels(
                np.array([[12, 24, 24]]), lengths[None], np.ones(1), inside.shape, rays
            )
            scores[rays].append(iou(drawn > 0, inside))
    assert np.mean(scores[(4.0, 1.0, 1.0)]) > 0.85  # measured 0.89
    assert np.mean(scores[(4.0, 1.0, 1.0)]) > np.mean(scores[None]) + 0.1  # even in voxels: 0.70
    points = np.array([[12, 24, 24], [12, 26, 25]])
    same = np.full((2, 96), 5.0)
    assert len(suppress(points, np.array([0.9, 0.8]), same, 0.4, (4.0, 1.0, 1.0))) == 1


# --- training -------------------------------------------------------------------------------


def test_crops_on_a_grid_carry_the_targets_of_every_second_pixel(simulated_store: Path) -> None:
    """StarDist's grid: the same crop, and the targets of every second pixel of the output
    region, distances still in pixels."""
    image = ome_io.open_image(simulated_store)
    labels = ome_io.open_labels(simulated_store, "ground_truth")
    margin = context(2, grid=2)
    assert margin == 40
    every = LabelledCrops(image, labels, 112, margin, Normalisation(0, 1), 0, 4, 8)
    second = LabelledCrops(image, labels, 112, margin, Normalisation(0, 1), 0, 4, 8, grid=2)
    for index in range(3):
        full, coarse = every[index], second[index]
        assert torch.equal(full[0], coarse[0])
        assert coarse[1].shape == coarse[3].shape == (16, 16)
        assert coarse[2].shape == (8, 16, 16)
        for a, b in zip(full[1:], coarse[1:], strict=True):
            assert torch.equal(a[..., ::2, ::2], b)
    assert coarse[2].max() > 4  # rays of a 16 px nucleus, in pixels


def test_a_network_on_a_grid_predicts_every_second_pixel() -> None:
    """Output sizes, context and pooling step of a depth-2 network on a grid of 2: its output is
    one value per 2 px, and shifting the input by the pooling step (8 px) shifts it by 4."""
    config = ModelConfig(depth=2, feature_maps=2, out_channels=9, grid=2)
    size = smallest_valid_size_at_least(100, 2, grid=2)
    assert output_size(size - 1, 2, grid=2) is None  # odd sizes do not fit the grid
    out = output_size(size, 2, grid=2)
    assert out is not None and size == 2 * out + 2 * context(2, grid=2)
    assert pooling_step(2, grid=2) == 8
    torch.manual_seed(0)
    network = UNet(config).eval()
    image = torch.randn(1, 1, size + 8, size + 8)
    with torch.no_grad():
        a = network(image[..., :size, :size])
        b = network(image[..., 8:, 8:])
    assert a.shape[-2:] == (out, out)
    assert torch.allclose(a[..., 4:, 4:], b[..., :-4, :-4], atol=1e-5)
    with pytest.raises(ValueError, match="2D"):
        UNet(ModelConfig(spatial_dims=3, depth=1, grid=2))


def test_an_oce_model_refuses_a_grid(simulated_store: Path, tmp_path: Path) -> None:
    """An OCE model embeds every pixel: a grid is refused before anything is written."""
    from cellulus_scale.training.oce import train

    with pytest.raises(UserInputError, match="a grid is for StarDist models"):
        train(simulated_store, tmp_path / "m.pt", preset="cpu", grid=2, progress=False)
    assert not (tmp_path / "m.pt").exists()


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
    assert (checkpoint.model_config.depth, checkpoint.model_config.grid) == (2, 2)
    assert checkpoint.model_config.outputs == 1 + 32
    assert checkpoint.train_config["labels"] == "ground_truth"
    assert checkpoint.train_config["lr_drops"] == [0.6, 0.8]
    with model.with_suffix(".loss.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, 81))
    assert {"prob", "dist"} <= set(rows[0])
    early = np.mean([float(r["loss"]) for r in rows[:10]])
    late = np.mean([float(r["loss"]) for r in rows[-10:]])
    assert late < early, "the loss should fall"
    assert model.with_suffix(".loss.png").stat().st_size > 0


def test_resume_after_an_interrupt_is_exact(
    simulated_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full, split = tmp_path / "full.pt", tmp_path / "split.pt"
    train_supervised(simulated_store, full, labels="ground_truth", epochs=2, **TINY)
    calls = iter(range(10**6))
    to_device = loop._to_device

    def interrupted(batch, device):  # Ctrl-C when step 7 is about to run
        if isinstance(batch, list | tuple) and next(calls) == 6:  # a step's whole batch
            raise KeyboardInterrupt
        return to_device(batch, device)

    monkeypatch.setattr(loop, "_to_device", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_supervised(simulated_store, split, labels="ground_truth", epochs=2, **TINY)
    monkeypatch.undo()
    assert load_checkpoint(split).training_state["step"] == 6  # 6 crops of 112x112 an epoch
    resumed = train_supervised(simulated_store, split, resume=True, progress=False)
    assert resumed.steps == 12
    a, b = load_checkpoint(full).state_dict, load_checkpoint(split).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserInputError, match="no label image named 'other'"):
        train_supervised(simulated_store, split, labels="other", resume=True, progress=False)


# --- blockwise prediction --------------------------------------------------------------------


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
    # in 'nucleus' mode (the default) the outlines too: the same labels, voxel for voxel
    assert np.array_equal(results[96], results[128])
    # IDs are unique over the video
    assert not set(np.unique(results[96][0])[1:]) & set(np.unique(results[96][1])[1:])


def test_nucleus_mode_outlines_polygons_by_their_intensities(
    video: Path, model: Path, workdir: Path, client: Client
) -> None:
    """'nucleus' mode (the default) grows every polygon by d/4 and keeps, inside it, what the
    object's intensity threshold keeps: outlines nearer the truth than the polygons drawn alone
    ('none'), and no object reaching beyond its grown polygon."""
    labels, scores = {}, {}
    for mode in ("none", "nucleus"):
        out = workdir / f"sd_mode_{mode}.zarr"
        predict(video, out, model, diameter=24, mode=mode, client=client, progress=False)
        labels[mode] = ome_io.open_labels(out, "cellulus").data.compute()
        truth = ome_io.open_labels(video, "ground_truth").data.compute()
        scores[mode] = combine(
            [score_frame(truth[t], labels[mode][t]) for t in range(truth.shape[0])]
        )
    assert scores["nucleus"].seg > scores["none"].seg + 0.02
    assert scores["nucleus"].f1 >= scores["none"].f1 - 0.02
    for t in range(labels["none"].shape[0]):
        grown = expand_labels(labels["none"][t], distance=6)  # d/4 for d = 24
        outlined = labels["nucleus"][t]
        assert np.array_equal(outlined[outlined > 0], grown[outlined > 0])


def test_resume_finishes_an_interrupted_run_identically(
    video: Path, model: Path, workdir: Path, client: Client
) -> None:
    out = workdir / "sd_resume.zarr"
    predict(video, out, model, diameter=24, block_size=128, client=client, progress=False)
    reference = ome_io.open_labels(out, "cellulus").data.compute()
    shutil.rmtree(out)
    # interrupt: stop after the candidates of some blocks by failing the labels stage
    predict_args = {"diameter": 24, "block_size": 128, "client": client, "progress": False}
    from cellulus_scale.methods import stardist as predict_stardist

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


@pytest.fixture(scope="module")
def volume(workdir: Path) -> Path:
    """A 3D video taller than one block in z (100 = 88 + 12 = 96 + 4)."""
    spec = SimulationSpec(frames=1, shape=(100, 48, 48), diameter=10)
    return write_simulation(workdir / "volume.zarr", spec)


def untrained_3d_checkpoint(volume: Path, path: Path) -> Path:
    """A random (untrained) 3D StarDist model whose probability varies over the volume and is
    above 0.5 on ~1% of it, with rays of about 4 voxels."""
    torch.manual_seed(2)
    config = ModelConfig(spatial_dims=3, depth=3, feature_maps=4, out_channels=1 + 16)
    net = UNet(config)
    normalisation = Normalisation(136, 1136)
    raw = ome_io.open_image(volume).canonical()[0].compute()
    size = smallest_valid_size_at_least(100 + 2 * context(3), 3)
    pad = ((0, 0),) + tuple((44, size - 44 - s) for s in raw.shape[1:])
    window = np.pad(normalisation.apply(raw), pad, mode="reflect")
    with torch.no_grad():
        net.head[-1].weight[0] *= 100
        net.head[-1].weight[1:] *= 0.01
        net.head[-1].bias[1:] = 4.0
        logit = net(torch.from_numpy(np.ascontiguousarray(window[None])))[0, 0].numpy()
        net.head[-1].bias[0] = -float(np.percentile(logit, 99))
    checkpoint = Checkpoint("stardist", config, normalisation, net.state_dict(), "tzyx", {}, {})
    save_checkpoint(checkpoint, path)
    return path


def test_3d_crops_carry_targets_for_rays_on_a_sphere(volume: Path) -> None:
    image = ome_io.open_image(volume)
    labels = ome_io.open_labels(volume, "ground_truth")
    crops = LabelledCrops(image, labels, 24, 4, Normalisation(136, 1136), 0, 2, 96)
    crop, probability, distances, weight = crops[0]
    assert crop.shape == (1, 24, 24, 24)
    assert probability.shape == weight.shape == (16, 16, 16)
    assert distances.shape == (96, 16, 16, 16)
    assert torch.all((probability >= 0) & (probability <= 1))


def test_3d_training_uses_rays_on_a_sphere(tmp_path: Path) -> None:
    """Two steps on cubes of 92 voxels (isotropic voxels: crops alike on every axis)."""
    spec = SimulationSpec(frames=1, shape=(96, 96, 96), diameter=10)
    video = write_simulation(tmp_path / "cube.zarr", spec)
    path = tmp_path / "sd3_trained.pt"
    tiny = {k: v for k, v in TINY.items() if k != "n_rays"}  # the 3D default: 96
    tiny.update(crop_size=92, min_crops_per_epoch=2)
    result = train_supervised(video, path, labels="ground_truth", epochs=1, **tiny)
    assert result.steps == 2
    checkpoint = load_checkpoint(path, kind="stardist")
    assert checkpoint.model_config.spatial_dims == 3
    assert checkpoint.model_config.outputs == 1 + 96 == 1 + checkpoint.train_config["n_rays"]


def test_3d_labels_do_not_depend_on_block_size(volume: Path, workdir: Path, client: Client) -> None:
    model = untrained_3d_checkpoint(volume, workdir / "sd3.pt")
    results = {}
    for size in (88, 96):
        out = workdir / f"sd3_{size}.zarr"
        result = predict(
            volume, out, model, diameter=10, block_size=size, client=client, progress=False
        )
        assert result.blocks == 2  # split in z
        assert ome_io.run_status(out)["status"] == "complete"
        results[size] = ome_io.open_labels(out, "cellulus").data.compute()
    assert results[88].shape == (1, 100, 48, 48)
    assert len(np.unique(results[88])) > 50
    assert (results[88] == results[96]).mean() > 0.999
    assert f1_at(results[96][0], results[88][0], 0.9) >= 0.99


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
        112,
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


def test_cli_refuses_a_grid_for_a_volume(
    cli_runner: CliRunner, volume: Path, tmp_path: Path
) -> None:
    code, lines, _ = invoke(
        cli_runner,
        "train-supervised",
        volume,
        tmp_path / "m.pt",
        "--labels",
        "ground_truth",
        "--grid",
        2,
    )
    assert code == 2 and len(lines) == 1 and "--grid 2 is for 2D images" in lines[0], lines
    assert not (tmp_path / "m.pt").exists()
