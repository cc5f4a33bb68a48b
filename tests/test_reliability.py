"""Interrupted runs resume exactly; a killed worker loses nothing; incomplete output is refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellulus_scale.io.ome_zarr import open_labels, run_status
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import train

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    workdir = tmp_path_factory.mktemp("reliability")
    video = write_simulation(workdir / "video.zarr", SimulationSpec(frames=4, shape=(192, 192)))
    model = workdir / "model.pt"
    train(video, model, preset="cpu", epochs=1, min_crops_per_epoch=160, progress=False)
    return workdir, video, model


def predict_args(video: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "cellulus-scale"),
        "predict",
        str(video),
        str(out),
        "--model",
        str(model),
        "--diameter",
        "24",
        "--tta",
        "8",
        "--block-size",
        "64",
        "--workers",
        "1",
        *extra,
    ]


def wait_for_markers(out: Path, count: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    folder = out / ".cellulus-scale" / "oce"
    while time.time() < deadline:
        if folder.exists() and len(list(folder.glob("*.npz"))) >= count:
            return
        time.sleep(0.2)
    raise AssertionError("the run made no progress")


def labels_of(path: Path) -> np.ndarray:
    return open_labels(path, "cellulus").data.compute()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_resumes_to_identical_labels(setup, stop_signal):
    workdir, video, model = setup
    reference = workdir / "reference.zarr"
    if not reference.exists():
        done = subprocess.run(
            predict_args(video, model, reference), capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr
    out = workdir / f"interrupted_{stop_signal.name}.zarr"
    process = subprocess.Popen(
        predict_args(video, model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_markers(out, 6)
    process.send_signal(stop_signal)
    process.wait(timeout=120)
    assert process.returncode != 0
    assert run_status(out)["status"] == "incomplete"
    # the OCEs kept between stages are the compact scratch (one byte per value), not float32
    scratch = zarr.open_array(str(out / ".cellulus-scale" / "compact-oces" / "0"), mode="r")
    assert scratch.dtype == np.uint8 and scratch.shape == (4, 3, 192, 192)
    assert not (out / "embeddings").exists()
    for command in (["evaluate", str(out)], ["preview", str(out), "-o", str(workdir / "p.png")]):
        refused = subprocess.run(
            [str(BIN / "cellulus-scale"), *command], capture_output=True, text=True, timeout=120
        )
        assert refused.returncode == 2 and "--resume" in refused.stderr
    done_before = len(list((out / ".cellulus-scale" / "oce").glob("*.npz")))
    resumed = subprocess.run(
        predict_args(video, model, out, "--resume"), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    total = 4 * 9
    assert f"oce {total - done_before}/{total}" in resumed.stdout
    assert run_status(out)["status"] == "complete"
    assert np.array_equal(labels_of(out), labels_of(reference))


def test_killed_worker_is_replaced_and_labels_are_identical(setup):
    workdir, video, model = setup
    reference = workdir / "reference.zarr"
    if not reference.exists():
        subprocess.run(
            predict_args(video, model, reference), check=True, capture_output=True, timeout=600
        )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen(
        [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        **quiet,
    )
    workers = [
        subprocess.Popen(
            [
                BIN / "dask",
                "worker",
                address,
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--no-nanny",
            ],
            **quiet,
        )
        for _ in range(2)
    ]
    out = workdir / "killed.zarr"
    try:
        arguments = predict_args(video, model, out, "--scheduler", address)
        arguments.remove("--workers")
        arguments.remove("1")
        process = subprocess.Popen(
            arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        wait_for_markers(out, 3)
        os.kill(workers[0].pid, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    finally:
        for child in [*workers, scheduler]:
            child.kill()
            child.wait(timeout=30)
    assert np.array_equal(labels_of(out), labels_of(reference))
