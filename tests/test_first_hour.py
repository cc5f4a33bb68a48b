"""What a new user meets in the first hour: a Ctrl-C is one line, input problems are found
before anything is written or say how to finish, the demo gives the same figures on every run
and writes its preview, and a TIFF is met with how to convert it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from cellulus_scale.io.ome_zarr import run_status, write_image
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import train

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("first-hour")
    video = write_simulation(folder / "train.zarr", SimulationSpec(frames=1, shape=(128, 128)))
    path = folder / "model.pt"
    train(
        video,
        path,
        preset="cpu",
        feature_maps=4,
        epochs=1,
        min_crops_per_epoch=8,
        num_workers=0,
        progress=False,
    )
    return path


def command(*args: object) -> list[str]:
    return [str(BIN / "cellulus-scale"), *map(str, args)]


def test_ctrl_c_in_the_terminal_is_one_line(tmp_path, model):
    video = write_simulation(tmp_path / "video.zarr", SimulationSpec(frames=6, shape=(256, 256)))
    out = tmp_path / "out.zarr"
    arguments = ("predict", video, out, "--model", model, "--diameter", 24, "--block-size", 64)
    process = subprocess.Popen(  # its own process group, as a terminal's foreground job
        command(*arguments),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    markers = out / ".cellulus-scale" / "oce"
    deadline = time.time() + 300
    while not (markers.exists() and any(markers.glob("*.npz"))):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1]
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: every process of the group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == [
        "Error: interrupted; an unfinished output is marked incomplete (rerun with --resume)"
    ]


def float_video(path: Path, nan_at: tuple[int, int, int] | None) -> Path:
    values = SimulationSpec(frames=2, shape=(640, 640), seed=3)
    from cellulus_scale.simulation.simulate import simulate_frames

    frames = np.stack([image for image, _, _ in simulate_frames(values)]).astype(np.float32)
    if nan_at is not None:
        frames[nan_at] = np.nan
    write_image(path, da.from_array(frames, chunks=(1, 128, 128)), "tyx", (1, 1, 1), "v")
    return path


def test_nan_in_the_sample_stops_the_run_before_anything_is_written(tmp_path, model):
    video = float_video(tmp_path / "video.zarr", (1, 320, 320))  # the frame's centre
    out = tmp_path / "out.zarr"
    done = subprocess.run(
        command("predict", video, out, "--model", model, "--diameter", 24),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"Error: frame 1 of {video} contains NaN values; replace them (e.g. with 0) before"
        " predicting"
    )
    assert not out.exists()


def test_nan_found_mid_run_says_how_to_finish_after_the_fix(tmp_path, model):
    video = float_video(tmp_path / "video.zarr", (1, 5, 5))  # outside the cheap sample
    out = tmp_path / "out.zarr"
    run = ("predict", video, out, "--model", model, "--diameter", 24, "--workers", 1)
    first = subprocess.run(command(*run), capture_output=True, text=True, timeout=300)
    assert first.returncode == 2 and "frame 1" in first.stderr and "NaN" in first.stderr
    assert run_status(out)["status"] == "incomplete"
    again = subprocess.run(command(*run), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "unfinished run (frame 1" in again.stderr and "--resume" in again.stderr
    assert "--overwrite" in again.stderr
    scored = subprocess.run(command("evaluate", out), capture_output=True, text=True)
    assert scored.returncode == 2 and "stopped on frame 1" in scored.stderr
    assert "--resume" in scored.stderr
    array = zarr.open_array(str(video / "0"), mode="r+")
    array[1, 5, 5] = 0.0  # the user fixes the input
    resumed = subprocess.run(command(*run, "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert run_status(out)["status"] == "complete"


def final_figures(stdout: str) -> str:
    line = [text for text in stdout.splitlines() if text.startswith("F1 ")][-1]
    return re.sub(r"\(\d+ s in all\)", "", line)


def test_the_demo_gives_the_same_figures_under_load_and_writes_its_preview(tmp_path):
    arguments = ("demo", "--frames", 2, "--size", 128)
    quiet = subprocess.run(
        command(*arguments[:1], tmp_path / "a", *arguments[1:]),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert quiet.returncode == 0, quiet.stderr
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a competing CPU job
    try:
        loaded = subprocess.run(
            command(*arguments[:1], tmp_path / "b", *arguments[1:]),
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        load.kill()
        load.wait()
    assert loaded.returncode == 0, loaded.stderr
    assert final_figures(quiet.stdout) == final_figures(loaded.stdout)
    assert "diameter estimated" in final_figures(quiet.stdout)
    preview = tmp_path / "a" / "preview.png"
    assert preview.stat().st_size > 0 and str(preview) in quiet.stdout


def test_a_tiff_is_met_with_how_to_convert_it(tmp_path):
    tiff = tmp_path / "cells.tif"
    tiff.write_bytes(b"II*\x00")
    done = subprocess.run(
        command("predict", tiff, tmp_path / "out.zarr"), capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "TIFF" in done.stderr and "bioformats2raw" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
