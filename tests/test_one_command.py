"""The one command: `cellulus-scale predict in.zarr out.zarr` trains on its input, estimates the
diameter, predicts, records both, and resumes after an interruption in either part."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_models.v04 import Image, ImageLabel, Labels

from cellulus_scale.evaluation.evaluate import evaluate
from cellulus_scale.io.ome_zarr import open_labels, run_status
from cellulus_scale.model.checkpoint import load_checkpoint
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation

BIN = Path(sys.executable).parent
SPEC = SimulationSpec(frames=2, shape=(160, 160), diameter=20.0, seed=5)
FAST = ("--train-epochs", "1", "--workers", "1")  # 40 training steps


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_simulation(tmp_path_factory.mktemp("one") / "video.zarr", SPEC)


def command(*args: object) -> list[str]:
    return [str(BIN / "cellulus-scale"), *map(str, args)]


def labels_of(path: Path) -> np.ndarray:
    return open_labels(path, "cellulus").data.compute()


def test_the_literal_command_trains_estimates_predicts_and_records(video, tmp_path):
    out = tmp_path / "out.zarr"
    done = subprocess.run(
        command("predict", video, out, *FAST), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "estimated object diameter" in done.stdout and "model.pt" in done.stdout
    status = run_status(out)
    assert status["status"] == "complete" and status["diameter_estimated"] is True
    assert abs(status["diameter"] - SPEC.diameter) < 0.15 * SPEC.diameter
    model = out / "model.pt"
    assert status["model"] == str(model) and model.with_suffix(".loss.csv").exists()
    checkpoint = load_checkpoint(model, kind="oce")
    assert checkpoint.training_state["step"] > 0
    assert not (out / ".cellulus-scale").exists()
    root = zarr.open_group(str(out), mode="r")
    Image.from_zarr(root)
    Labels.from_zarr(root["labels"])
    ImageLabel.from_zarr(root["labels"]["cellulus"])
    assert evaluate(out, video).overall.f1 > 0.5
    written = len(np.unique(labels_of(out))) - 1  # the count reported is what the store holds
    assert status["objects"] == written and f"{written} objects" in done.stdout
    # the kept model and the recorded diameter give the same labels again
    again = tmp_path / "again.zarr"
    reused = subprocess.run(
        command(
            "predict",
            video,
            again,
            "--model",
            model,
            "--diameter",
            status["diameter"],
            "--workers",
            "1",
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert reused.returncode == 0, reused.stderr
    assert np.array_equal(labels_of(again), labels_of(out))


def test_the_literal_command_trains_on_a_dask_worker(video, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen(
        [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        **quiet,
    )
    worker = subprocess.Popen(
        [
            BIN / "dask",
            "worker",
            address,
            "--nthreads",
            "1",
            "--host",
            "127.0.0.1",
            "--no-dashboard",
        ],
        **quiet,
    )
    out = tmp_path / "remote.zarr"
    try:
        done = subprocess.run(
            command("predict", video, out, "--scheduler", address, "--train-epochs", "1"),
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        for process in (worker, scheduler):
            process.kill()
            process.wait(timeout=30)
    assert done.returncode == 0, done.stderr
    status = run_status(out)
    assert status["status"] == "complete" and (out / "model.pt").exists()
    assert labels_of(out).max() > 0


def interrupt_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()[1]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr


def test_an_interrupted_training_resumes_where_it_stopped(video, tmp_path):
    out = tmp_path / "out.zarr"
    work_model = out / ".cellulus-scale" / "model.pt"
    process = subprocess.Popen(
        command("predict", video, out, *FAST),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    interrupt_when(process, work_model.exists)  # kept as soon as the schedule is planned
    stopped = load_checkpoint(work_model, kind="oce").training_state
    assert 0 < stopped["step"] < stopped["planned_steps"]
    assert run_status(out)["status"] == "incomplete"
    resumed = subprocess.run(
        command("predict", video, out, *FAST, "--resume"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    state = load_checkpoint(out / "model.pt", kind="oce").training_state
    assert state["step"] == stopped["planned_steps"]  # the same plan, carried to its end
    steps = [int(line.split(",")[0]) for line in (out / "model.loss.csv").read_text().split()[1:]]
    assert steps == list(range(1, state["step"] + 1))  # continued, not started again
    assert run_status(out)["status"] == "complete"


def test_an_interrupted_prediction_reuses_the_trained_model(video, tmp_path):
    out = tmp_path / "out.zarr"
    markers = out / ".cellulus-scale" / "oce"
    arguments = ("predict", video, out, *FAST, "--block-size", "64")
    process = subprocess.Popen(
        command(*arguments), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    interrupt_when(process, lambda: markers.exists() and len(list(markers.glob("*.npz"))) >= 3)
    trained = load_checkpoint(out / ".cellulus-scale" / "model.pt").state_dict
    resumed = subprocess.run(
        command(*arguments, "--resume"), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "reusing the model trained before" in resumed.stdout
    kept = load_checkpoint(out / "model.pt").state_dict
    assert all(np.array_equal(kept[k].numpy(), trained[k].numpy()) for k in kept)
    assert run_status(out)["status"] == "complete"


@pytest.mark.parametrize(
    ("values", "problem", "fix"),
    [
        (np.zeros((2, 64, 64), np.uint16), "no contrast", "--diameter"),
        (np.full((2, 64, 64), 7, np.uint16), "no contrast", "--diameter"),
        (np.random.default_rng(0).integers(0, 99, (1, 30, 30)), "too small to train", "--model"),
    ],
    ids=["all-zero", "constant", "too-small"],
)
def test_what_the_literal_command_cannot_do_is_one_line(tmp_path, values, problem, fix):
    import dask.array as da

    from cellulus_scale.io.ome_zarr import write_image

    video = tmp_path / "video.zarr"
    write_image(video, da.from_array(values.astype(np.uint16)), "tyx", (1, 1, 1), "video")
    out = tmp_path / "out.zarr"
    done = subprocess.run(command("predict", video, out), capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0] and fix in lines[0], done.stderr
    assert not out.exists()
