"""Self-supervised training: exact resume, checkpoints it writes, CLI errors, and that it learns."""

from __future__ import annotations

import csv
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from cellulus_scale.cli.main import main as cli
from click.testing import CliRunner

from cellulus_scale.config import PRESETS, ModelConfig
from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr as ome_io
from cellulus_scale.kernels.noise import reflect_indices
from cellulus_scale.kernels.normalisation import Normalisation
from cellulus_scale.kernels.oce import predict_oce_block
from cellulus_scale.model.checkpoint import load_checkpoint
from cellulus_scale.model.unet import UNet, context, smallest_valid_size_at_least
from cellulus_scale.simulation.simulate import SimulationSpec, ground_truth_centres
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training import loop as train_module
from cellulus_scale.training.oce import train

# 10 steps per epoch on the shared 4 x 128 x 128 store; the learning rate drops after a third
# and two thirds of the run (epochs 1 and 2 of 3).
TINY = {
    "preset": "cpu",
    "feature_maps": 4,
    "crop_size": 60,
    "batch_size": 2,
    "min_crops_per_epoch": 8,
    "num_workers": 0,
    "lr_drops": (1 / 3, 2 / 3),
    "progress": False,
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared machine torch's default (one per core) stalls in
    OpenMP barriers whenever other processes hold a core, and runs 2-5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def logged_losses(model: Path) -> list[tuple[int, str]]:
    with model.with_suffix(".loss.csv").open() as handle:
        return [(int(row["step"]), row["loss"]) for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def full_run(simulated_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny epochs in one go: the reference the resumed runs must match exactly."""
    model = tmp_path_factory.mktemp("full") / "model.pt"
    result = train(simulated_store, model, epochs=3, **TINY)
    assert result.steps == result.total_steps == 30 and not result.stopped_early
    return model


def test_training_writes_a_checkpoint_log_and_plot(full_run: Path) -> None:
    checkpoint = load_checkpoint(full_run, kind="oce")
    assert checkpoint.model_config == ModelConfig(feature_maps=4)
    assert checkpoint.train_config["crop_size"] == 60
    assert checkpoint.train_config["lr_drops"] == [1 / 3, 2 / 3]
    assert checkpoint.training_state["step"] == 30
    assert checkpoint.normalisation.high > checkpoint.normalisation.low
    assert checkpoint.data_axes == "tyx"
    with full_run.with_suffix(".loss.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert sorted({float(r["lr"]) for r in rows}) == pytest.approx([1e-5, 1e-4, 1e-3])
    assert full_run.with_suffix(".loss.png").stat().st_size > 0


def interrupt_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """Make the training loop meet a KeyboardInterrupt (Ctrl-C, or SIGTERM through the CLI)
    when it is about to run step ``steps + 1``."""
    calls = iter(range(10**6))
    to_device = train_module._to_device

    def interrupted(batch, device):
        if next(calls) == steps:
            raise KeyboardInterrupt
        return to_device(batch, device)

    monkeypatch.setattr(train_module, "_to_device", interrupted)


@pytest.mark.parametrize("stop", [10, 15], ids=["at-an-epoch-end", "inside-an-epoch"])
def test_resume_after_an_interrupt_is_exact(
    simulated_store: Path, full_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop
) -> None:
    model = tmp_path / "model.pt"
    interrupt_after(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        train(simulated_store, model, epochs=3, **TINY)
    assert load_checkpoint(model).training_state["step"] == stop
    monkeypatch.undo()
    resumed = train(simulated_store, model, resume=True, progress=False, num_workers=0)
    assert resumed.steps == 30
    assert resumed.final_loss == pytest.approx(
        load_checkpoint(full_run).training_state["loss"], abs=0
    )
    assert_same_weights(model, full_run)
    assert logged_losses(model) == logged_losses(full_run)


def test_a_time_budget_fits_the_whole_schedule_and_resumes_it(
    simulated_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter(range(10**6))  # a fake clock: every reading is one second later
    fake = types.SimpleNamespace(perf_counter=lambda: float(next(clock)))
    monkeypatch.setattr(train_module, "time", fake)
    to_device = train_module._to_device
    model = tmp_path / "model.pt"
    late = {**TINY, "lr_drops": (0.8, 0.9)}  # drops after the pace is known (step 15)
    budget = train(simulated_store, model, epochs=3, max_minutes=1.5, **late)
    # the first steps set the pace; the run is planned to end within 90 s, schedule and all
    assert 10 < budget.steps == budget.total_steps < 30 and not budget.stopped_early
    rates = [float(r["lr"]) for r in csv.DictReader(model.with_suffix(".loss.csv").open())]
    first_drop = next(i for i, r in enumerate(rates) if r < 1e-3)
    second_drop = next(i for i, r in enumerate(rates) if r < 1e-4)
    assert first_drop == round(0.8 * budget.steps) and second_drop == round(0.9 * budget.steps)
    # a budget run interrupted and resumed continues its own plan exactly
    interrupted = tmp_path / "interrupted.pt"
    clock = iter(range(10**6))
    interrupt_after(monkeypatch, 17)  # after the plan at step 15
    with pytest.raises(KeyboardInterrupt):
        train(simulated_store, interrupted, epochs=3, max_minutes=1.5, **late)
    monkeypatch.setattr(train_module, "time", time)
    monkeypatch.setattr(train_module, "_to_device", to_device)
    resumed = train(simulated_store, interrupted, resume=True, progress=False, num_workers=0)
    assert resumed.steps == budget.steps
    assert_same_weights(interrupted, model)


def test_loader_workers_do_not_change_the_crops(simulated_store: Path, tmp_path: Path) -> None:
    serial, parallel = tmp_path / "serial.pt", tmp_path / "parallel.pt"
    train(simulated_store, serial, epochs=1, **TINY)
    train(simulated_store, parallel, epochs=1, **{**TINY, "num_workers": 2})
    assert_same_weights(serial, parallel)


def test_resume_refuses_changed_settings_and_finished_runs(
    simulated_store: Path, full_run: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(full_run.read_bytes())
    with pytest.raises(UserInputError, match="crop-size"):
        train(simulated_store, model, resume=True, progress=False, crop_size=124)
    with pytest.raises(UserInputError, match="--epochs 3"):
        train(simulated_store, model, resume=True, epochs=1, progress=False)
    done = train(simulated_store, model, resume=True, progress=False)
    assert done.steps == 30 and done.final_loss == pytest.approx(logged_float(full_run))
    assert_same_weights(model, full_run)
    with pytest.raises(TypeError, match="featuremaps"):
        train(simulated_store, tmp_path / "typo.pt", featuremaps=4, **TINY)


def test_trains_on_3d_video(tmp_path: Path) -> None:
    video = write_simulation(
        tmp_path / "sim3d.zarr", SimulationSpec(frames=1, shape=(40, 48, 48), diameter=12.0)
    )
    model = tmp_path / "model3d.pt"
    small = {**TINY, "feature_maps": 2, "crop_size": 40, "batch_size": 1, "min_crops_per_epoch": 3}
    result = train(video, model, epochs=1, **small)
    assert result.steps == 3
    checkpoint = load_checkpoint(model)
    assert checkpoint.model_config.spatial_dims == 3 and checkpoint.model_config.outputs == 3
    # 3D crops are per axis: --crop-size is the in-plane side (at most the 48 px planes), and
    # the planes follow from it, at most the 40 of the stack
    with pytest.raises(UserInputError, match="use --crop-size 48 or smaller"):
        train(video, tmp_path / "big.pt", epochs=1, **{**small, "crop_size": 52})


def logged_float(model: Path) -> float:
    return float(logged_losses(model)[-1][1])


# --- command line -------------------------------------------------------------------------


def run_train(runner: CliRunner, *args: object) -> tuple[int, list[str]]:
    result = runner.invoke(cli, ["train", *map(str, args)])
    assert "Traceback" not in (result.stderr + result.stdout)
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    return result.exit_code, result.stderr.strip().splitlines()


def test_cli_missing_data_path(cli_runner: CliRunner, tmp_path: Path) -> None:
    code, lines = run_train(cli_runner, tmp_path / "nowhere.zarr", tmp_path / "m.pt")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("Error:") and "nowhere.zarr" in lines[0]


@pytest.mark.parametrize(("crop", "named"), [(251, ["250", "252"]), (20, ["38"]), (300, ["128"])])
def test_cli_bad_crop_sizes_name_valid_sizes(
    cli_runner: CliRunner, simulated_store: Path, tmp_path: Path, crop: int, named: list[str]
) -> None:
    code, lines = run_train(
        cli_runner, simulated_store, tmp_path / "m.pt", "--preset", "cpu", "--crop-size", crop
    )
    assert code == 2 and len(lines) == 1
    assert f"crop size {crop}" in lines[0]
    for size in named:
        assert size in lines[0]
    assert not (tmp_path / "m.pt").exists()


def test_cli_resume_from_a_file_that_is_not_a_checkpoint(
    cli_runner: CliRunner, simulated_store: Path, tmp_path: Path
) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(np.random.default_rng(0).bytes(2048))
    code, lines = run_train(cli_runner, simulated_store, bogus, "--resume")
    assert code == 2 and len(lines) == 1
    assert "bogus.pt" in lines[0] and "checkpoint" in lines[0]


def test_cli_refuses_to_overwrite_a_model(
    cli_runner: CliRunner,
    simulated_store: Path,
    full_run: Path,
    tmp_path: Path,
    digest: Callable[[Path], dict[str, str]],
) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(full_run.read_bytes())
    before = digest(model)
    code, lines = run_train(cli_runner, simulated_store, model, "--preset", "cpu")
    assert code == 2 and len(lines) == 1
    assert "already exists" in lines[0] and "--overwrite" in lines[0]
    assert digest(model) == before


def test_cli_console_script_reports_a_missing_path(
    run_cli: Callable[..., object], tmp_path: Path
) -> None:
    result = run_cli("train", tmp_path / "absent.zarr", tmp_path / "m.pt")
    assert result.returncode == 2  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and "absent.zarr" in lines[0]


# --- it learns ------------------------------------------------------------------------------

DIAMETER = 24.0


def fraction_near_centre(video: Path, model: torch.nn.Module, norm: Normalisation) -> float:
    """Share of ground-truth foreground pixels whose centred embedding lies within a quarter
    diameter of their nucleus' centroid; whole frames, the network context as reflect padding."""
    depth = model.config.depth
    halo = context(depth)
    raw = np.asarray(ome_io.open_image(video).canonical()[:, :, 0])
    truth = np.asarray(ome_io.open_labels(video, "ground_truth").canonical()[:, 0, 0])
    near = total = 0
    for frame in range(raw.shape[0]):
        height, width = raw.shape[-2:]
        rows, cols = (
            reflect_indices(-halo, -halo + smallest_valid_size_at_least(n + 2 * halo, depth), n)
            for n in (height, width)
        )
        grids = [rows[:, None], cols[None, :]]
        block = norm.apply(raw[frame][:, rows[:, None], cols[None, :]])
        offsets, _ = predict_oce_block(model, block, grids, frame, 1, 0.0, (0.5,), 0)
        offsets = offsets[:, :height, :width]
        labels = truth[frame]
        foreground = labels > 0
        centres = ground_truth_centres(labels)
        ids = labels[foreground]
        centre = np.stack([np.array([centres[i][axis] for i in ids]) for axis in (0, 1)])
        r = offsets[:, foreground]
        r = r - r.mean(axis=1, keepdims=True)  # the loss cannot see a global shift
        embedding = np.stack(np.nonzero(foreground)) + r
        distance = np.sqrt(((embedding - centre) ** 2).sum(axis=0))
        near += int((distance < DIAMETER / 4).sum())
        total += distance.size
    return near / total


def test_cpu_preset_learns_object_centric_embeddings(tmp_path: Path) -> None:
    video = write_simulation(
        tmp_path / "sim.zarr", SimulationSpec(frames=4, shape=(256, 256), diameter=DIAMETER)
    )
    model_path = tmp_path / "model.pt"
    result = train(video, model_path, preset="cpu", epochs=4, num_workers=0, progress=False)
    assert result.steps == 4 * 160 // PRESETS["cpu"].train.batch_size
    checkpoint = load_checkpoint(model_path)
    trained = fraction_near_centre(video, checkpoint.build_model(), checkpoint.normalisation)
    torch.manual_seed(0)
    untrained_model = UNet(checkpoint.model_config).eval()
    untrained = fraction_near_centre(video, untrained_model, checkpoint.normalisation)
    print(f"within d/4 of the centroid: trained {trained:.3f}, untrained {untrained:.3f}")
    assert trained > 0.8
    assert trained > 2.5 * untrained
