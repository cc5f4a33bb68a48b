"""Bad input to ``predict``: one line naming the problem and the fix, exit code 2, no traceback,
and the input byte-identical afterwards.

Refusals that come before any Dask cluster starts run in-process (``cli_runner``); the cases a
task meets (a damaged chunk, NaN, a full disk) run the installed command in a subprocess on its
own LocalCluster. The model is an untrained checkpoint: these tests are about the machinery.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from cellulus_scale.cli.main import main

from cellulus_scale.config import ModelConfig
from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr as ome_io
from cellulus_scale.kernels.normalisation import Normalisation
from cellulus_scale.model.checkpoint import Checkpoint, save_checkpoint
from cellulus_scale.model.unet import UNet

BIN = Path(sys.executable).parent
#: quick settings for every run that gets as far as the cluster (128x128 frames: 4 blocks)
QUICK = ["--diameter", "16", "--tta", "2", "--block-size", "64", "--workers", "1"]


def assert_refused(code: int, stderr: str, stdout: str, *words: str) -> str:
    """Exit code 2, one line on stderr naming problem and fix, no traceback; the line."""
    assert code == 2, (code, stderr, stdout)
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and "; " in lines[0], lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


def refused_in_process(cli_runner, args, *words) -> str:
    result = cli_runner.invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return assert_refused(result.exit_code, result.stderr, result.output, *words)


def write_video(path: Path, values: np.ndarray) -> Path:
    """A (t, y, x) array as an NGFF 0.4 image, chunked like the blocks."""
    ome_io.write_image(
        path, da.from_array(values, chunks=(1, 64, 64)), "tyx", (1.0, 1.0, 1.0), path.stem
    )
    return path


def oce_markers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / ".cellulus-scale" / "oce").glob("*.npz"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, simulated_store: Path) -> Path:
    """An untrained 2D, 1-channel checkpoint normalised to the simulated intensities."""
    torch.manual_seed(0)
    config = ModelConfig(feature_maps=8)
    sample = zarr.open_array(str(simulated_store / "0"), mode="r")[0]
    low, high = np.percentile(sample, [1.0, 99.8])
    path = tmp_path_factory.mktemp("bad_input_model") / "model.pt"
    save_checkpoint(
        Checkpoint(
            "oce", config, Normalisation(float(low), float(high)), UNet(config).state_dict(), "tyx"
        ),
        path,
    )
    return path


@pytest.fixture
def tmpfs(tmp_path: Path):
    """``mount(options)``: a fresh tmpfs under tmp_path (root only; skips elsewhere)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


# --- unreadable input ------------------------------------------------------------------------


def _regular_file(path: Path, store: Path) -> None:
    path.write_text("not a zarr store\n")


def _garbage_array_header(path: Path, store: Path) -> None:
    shutil.copytree(store, path)
    (path / "0" / ".zarray").write_bytes(b"\x00garbage{")


def _garbage_root_attributes(path: Path, store: Path) -> None:
    shutil.copytree(store, path)
    (path / ".zattrs").write_text("{ not json")


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (None, ["no such file", "check the path"]),
        (_regular_file, ["not a readable zarr store"]),
        (_garbage_array_header, ["array", "is not readable", "damaged"]),
        (_garbage_root_attributes, ["not a readable zarr store"]),
    ],
    ids=["missing", "regular-file", "garbage-zarray", "garbage-zattrs"],
)
def test_missing_or_unreadable_input(
    tmp_path, simulated_store, model, cli_runner, digest, make, words
):
    # Tests run as root, for whom chmod 000 does not stop reading: a store is made unreadable
    # by damaging it instead.
    source = tmp_path / "input.zarr"
    if make is not None:
        make(source, simulated_store)
    before = digest(source) if source.exists() else None
    out = tmp_path / "out.zarr"
    refused_in_process(cli_runner, ["predict", source, out, "--model", model, *QUICK], *words)
    assert not out.exists()
    assert (digest(source) if source.exists() else None) == before


# --- a damaged chunk: named, the finished blocks kept, --resume after the repair --------------


def test_corrupted_chunk_is_named_and_resume_finishes_after_repair(
    tmp_path, simulated_store, model, run_cli, digest
):
    source = tmp_path / "damaged.zarr"
    shutil.copytree(simulated_store, source)
    chunk = source / "0" / "3" / "0" / "0"  # frame 3, the whole 128x128 frame in one chunk
    assert chunk.is_file()
    good = chunk.read_bytes()
    chunk.write_bytes(os.urandom(len(good)))
    before = digest(source)
    out = tmp_path / "out.zarr"
    args = ["predict", source, out, "--model", model, *QUICK]

    failed = run_cli(*args)
    line = assert_refused(failed.returncode, failed.stderr, failed.stdout, "frame 3", "--resume")
    assert "damaged chunk y 0:128, x 0:128" in line
    assert digest(source) == before
    assert ome_io.run_status(out)["status"] == "incomplete"
    kept = oce_markers(out)
    assert kept and not [m for m in kept if m.startswith("3_")], kept

    chunk.write_bytes(good)  # the repair
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"oce {16 - len(kept)}/16" in resumed.stdout
    assert ome_io.run_status(out)["status"] == "complete"
    assert digest(source) == digest(simulated_store)  # repaired, and never written to


# --- the output cannot be written --------------------------------------------------------------


def test_output_inside_a_regular_file(tmp_path, simulated_store, model, cli_runner, digest):
    before = digest(simulated_store)
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way\n")
    refused_in_process(
        cli_runner,
        ["predict", simulated_store, blocker / "out.zarr", "--model", model, *QUICK],
        "is a file, not a folder",
    )
    assert blocker.read_text() == "in the way\n"
    assert digest(simulated_store) == before


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_output_in_a_folder_that_takes_no_new_files(simulated_store, model, cli_runner, digest):
    # /proc refuses new entries even to root: an honest unwritable folder for any user
    before = digest(simulated_store)
    out = Path("/proc") / f"cellulus-{uuid.uuid4().hex}.zarr"
    refused_in_process(
        cli_runner, ["predict", simulated_store, out, "--model", model, *QUICK], "/proc", "writable"
    )
    assert not out.exists()
    assert digest(simulated_store) == before


def test_output_on_a_read_only_mount(simulated_store, model, cli_runner, digest, tmpfs):
    before = digest(simulated_store)
    folder = tmpfs("ro,size=1m")
    refused_in_process(
        cli_runner,
        ["predict", simulated_store, folder / "out.zarr", "--model", model, *QUICK],
        str(folder),
        "not writable",
    )
    assert list(folder.iterdir()) == []
    assert digest(simulated_store) == before


def test_full_disk_then_resume_after_freeing_space(
    tmp_path, simulated_store, model, run_cli, digest, tmpfs
):
    # A 64 KiB tmpfs takes the store's metadata but not the image copy and compact OCEs.
    before = digest(simulated_store)
    folder = tmpfs("size=64k")
    out = folder / "out.zarr"
    args = ["predict", simulated_store, out, "--model", model, *QUICK]
    failed = run_cli(*args)
    assert_refused(
        failed.returncode,
        failed.stderr,
        failed.stdout,
        "No space left on device",
        str(out),
        "--resume",
    )
    assert ome_io.run_status(out)["status"] == "incomplete"
    subprocess.run(["mount", "-o", "remount,size=16m", str(folder)], check=True)
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert ome_io.run_status(out)["status"] == "complete"
    assert digest(simulated_store) == before


def test_a_task_that_meets_a_full_disk_names_the_output(
    tmp_path, simulated_store, model, monkeypatch
):
    # Runs without root too: ENOSPC raised in-process by the write of a block marker, on a
    # threads-only cluster, so the patched function is the one the tasks call.
    from distributed import Client, LocalCluster

    from cellulus_scale.blockwise import engine
    from cellulus_scale.workflows import predict as predict_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(engine, "_save_marker", full)
    out = tmp_path / "out.zarr"
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        pytest.raises(UserInputError, match="No space left on device") as refused,
    ):
        predict_module.predict(
            simulated_store,
            out,
            model,
            diameter=16,
            tta=2,
            block_size=64,
            client=client,
            progress=False,
        )
    assert str(out) in str(refused.value) and "--resume" in str(refused.value)
    assert ome_io.run_status(out)["status"] == "incomplete"


# --- scheduler of other versions -------------------------------------------------------------

FAKE_VERSIONS = '''
"""Preload for 'dask scheduler': report another distributed version than the one installed."""
import distributed.node
import distributed.versions

_real = distributed.versions.get_versions  # the original, however often this is imported


def get_versions(packages=None):
    info = _real(packages=packages)
    info["packages"]["distributed"] = "2023.1.0"
    return info


distributed.node.get_versions = get_versions
'''


def test_scheduler_of_another_version_is_refused(
    tmp_path, simulated_store, model, cli_runner, digest
):
    # Only one distributed is installed here, so the scheduler is the installed one told (by a
    # preload) to report version 2023.1.0: this tests the check, not a real protocol mismatch.
    preload = tmp_path / "fake_versions.py"
    preload.write_text(FAKE_VERSIONS)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [
            BIN / "dask",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-dashboard",
            "--preload",
            str(preload),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    before = digest(simulated_store)
    out = tmp_path / "out.zarr"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        refused_in_process(
            cli_runner,
            [
                "predict",
                simulated_store,
                out,
                "--model",
                model,
                *QUICK[:-2],
                "--scheduler",
                address,
            ],
            address,
            "distributed 2023.1.0",
            "same",
        )
    finally:
        scheduler.kill()
        scheduler.wait(timeout=30)
    assert not out.exists()
    assert digest(simulated_store) == before


# --- checkpoints that do not fit -------------------------------------------------------------


def _checkpoint_cases(model: Path, folder: Path) -> dict[str, tuple[Path, list[str]]]:
    from cellulus_scale.model.checkpoint import load_checkpoint

    good = load_checkpoint(model)
    data = model.read_bytes()
    cases: dict[str, tuple[Path, list[str]]] = {}

    def case(name: str, words: list[str]) -> Path:
        cases[name] = (folder / f"{name}.pt", words)
        return cases[name][0]

    case("truncated", ["truncated or damaged"]).write_bytes(data[: len(data) // 2])
    case("empty", ["empty"]).write_bytes(b"")
    case("text", ["not a PyTorch file"]).write_text("weights: none\n")
    torch.save(UNet(good.model_config).state_dict(), case("bare_state_dict", ["another program"]))
    save_checkpoint(
        Checkpoint("classifier", good.model_config, good.normalisation, good.state_dict, "tyx"),
        case("other_kind", ["'classifier' model"]),
    )
    for name, config, axes, words in [
        ("3d_model", ModelConfig(spatial_dims=3, feature_maps=4), "tzyx", ["3D", "2D"]),
        ("two_channels", ModelConfig(in_channels=2, feature_maps=8), "tcyx", ["2 channel(s)"]),
    ]:
        save_checkpoint(
            Checkpoint("oce", config, good.normalisation, UNet(config).state_dict(), axes),
            case(name, words),
        )
    wider = UNet(ModelConfig(feature_maps=16)).state_dict()
    save_checkpoint(
        Checkpoint("oce", good.model_config, good.normalisation, wider, "tyx"),
        case("mismatched_weights", ["do not match"]),
    )
    return cases


def test_checkpoints_of_other_models_damaged_or_foreign(
    tmp_path, simulated_store, model, cli_runner, digest
):
    before = digest(simulated_store)
    out = tmp_path / "out.zarr"
    for name, (path, words) in _checkpoint_cases(model, tmp_path).items():
        kept = digest(path)
        line = refused_in_process(
            cli_runner, ["predict", simulated_store, out, "--model", path, *QUICK], *words
        )
        assert "MODEL" in line or "model" in line or "checkpoint" in line, (name, line)
        assert digest(path) == kept
        assert not out.exists()
    refused_in_process(
        cli_runner,
        ["predict", simulated_store, out, "--model", tmp_path / "none.pt", *QUICK],
        "no model checkpoint",
    )
    assert digest(simulated_store) == before


def test_checkpoints_are_not_loaded_with_an_unsafe_torch(
    tmp_path, simulated_store, model, cli_runner, monkeypatch
):
    """torch.load(weights_only=True) can run code from a crafted file before torch 2.10."""
    import torch

    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")
    out = tmp_path / "out.zarr"
    refused_in_process(
        cli_runner,
        ["predict", simulated_store, out, "--model", model, *QUICK],
        "torch 2.9.1+cpu is older than 2.10",
        "CVE-2026-24747",
        "torch>=2.10",
    )
    assert not out.exists()


# --- image values ----------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "Inf")])
def test_nan_or_inf_in_a_float_video(tmp_path, simulated_store, model, run_cli, digest, bad, word):
    values = zarr.open_array(str(simulated_store / "0"), mode="r")[:2].astype(np.float32)
    values[1, 100, 30] = bad
    source = write_video(tmp_path / "float.zarr", values)
    before = digest(source)
    result = run_cli("predict", source, tmp_path / "out.zarr", "--model", model, *QUICK)
    line = assert_refused(result.returncode, result.stderr, result.stdout, word, "frame 1")
    assert ("NaN" in line) == (word == "NaN")
    assert digest(source) == before


def test_all_zero_video_gives_empty_labels(tmp_path, model, run_cli, digest):
    source = write_video(tmp_path / "zeros.zarr", np.zeros((2, 128, 128), np.uint16))
    before = digest(source)
    out = tmp_path / "out.zarr"
    result = run_cli("predict", source, out, "--model", model, *QUICK)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert ": 0 objects" in result.stdout
    labels = ome_io.open_labels(out, "cellulus").data.compute()
    assert labels.shape == (2, 128, 128) and not labels.any()
    status = ome_io.run_status(out)
    assert status["status"] == "complete" and status["objects"] == 0
    assert status["statistics"]["frames_with_signal"] == [False, False]
    assert digest(source) == before


@pytest.mark.parametrize(
    ("diameter", "words"),
    [
        ("0", ["positive", "--diameter"]),
        ("-3", ["positive", "--diameter"]),
        ("nan", ["positive", "--diameter"]),
        ("inf", ["positive", "--diameter"]),
        ("-inf", ["positive", "--diameter"]),
        ("500", ["larger than the frame", "128x128"]),
        ("1e308", ["larger than the frame"]),
    ],
)
def test_absurd_diameter(tmp_path, simulated_store, model, cli_runner, digest, diameter, words):
    before = digest(simulated_store)
    out = tmp_path / "out.zarr"
    refused_in_process(
        cli_runner,
        ["predict", simulated_store, out, "--model", model, f"--diameter={diameter}", *QUICK[2:]],
        *words,
    )
    assert not out.exists()
    assert digest(simulated_store) == before


def test_precision_is_a_choice_and_the_cpu_ignores_it(cli_runner, simulated_store, model, tmp_path):
    args = ["predict", simulated_store, tmp_path / "bad.zarr", "--model", model, *QUICK]
    refused_in_process(cli_runner, [*args, "--precision", "half"], "precision", "half")
    assert not (tmp_path / "bad.zarr").exists()
    labels = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / f"{precision}.zarr"
        command = ["predict", simulated_store, out, "--model", model, *QUICK]
        result = cli_runner.invoke(main, [str(a) for a in [*command, "--precision", precision]])
        assert result.exit_code == 0, result.output
        labels[precision] = ome_io.open_labels(out, "cellulus").data.compute()
    # no GPU here: both ran in float32 and agree exactly
    assert labels["float32"].max() > 0
    np.testing.assert_array_equal(labels["float32"], labels["bfloat16"])
