"""Shared, generic test fixtures: a small simulated OME-Zarr store and CLI helpers."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from ome_zarr.writer import write_image as ome_write_image
from ome_zarr.writer import write_labels as ome_write_labels

from cellulus_scale.simulation.simulate import SimulationSpec, simulate_frames
from cellulus_scale.simulation.store import write_simulation

#: The spec of the session-scoped ``simulated_store``: 2D + t, small and quick to write.
SMALL_SPEC = SimulationSpec(frames=4, shape=(128, 128), diameter=16.0, seed=7)


@pytest.fixture(scope="session")
def simulated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated NGFF 0.4 store (axes tyx, ``labels/ground_truth``). Read-only: do
    not modify it; copy it (``shutil.copytree``) where a test needs to write."""
    path = tmp_path_factory.mktemp("simulated") / "small.zarr"
    return write_simulation(path, SMALL_SPEC)


#: Small inputs of the layouts users bring, for the metadata and viewer tests: shapes by axes
#: (y and x of 128, so that the outputs have a second pyramid level).
LAYOUTS = {
    "tyx": (3, 128, 128),
    "tcyx": (3, 2, 128, 128),
    "tzyx": (2, 16, 128, 128),
    "czyx": (2, 16, 128, 128),
}
#: Their physical metadata, which an output must carry: per axis, unit, scale and translation.
LAYOUT_UNITS = {"t": "second", "z": "micrometer", "y": "micrometer", "x": "micrometer"}
LAYOUT_SCALE = {"t": 30.0, "z": 2.0, "y": 0.5, "x": 0.5}
LAYOUT_TRANSLATION = {"t": 0.0, "z": 1.0, "y": 10.0, "x": -4.0}
#: The channels of the layouts with a ``c`` axis; the second one's display window is removed
#: after writing (NGFF 0.4 requires one, so the output completes it).
LAYOUT_OMERO = {
    "channels": [
        {
            "label": "nuclei",
            "color": "0000FF",
            "active": True,
            "window": {"min": 0, "max": 65535, "start": 0, "end": 4000},
        },
        {
            "label": "membrane",
            "color": "FF00FF",
            "active": True,
            "window": {"min": 0, "max": 65535, "start": 0, "end": 2000},
        },
    ]
}


def write_layout(path: Path, axes: str) -> Path:
    """An NGFF 0.5 image (written by ome-zarr-py) of the layout ``axes`` with simulated nuclei,
    units, scale, translation (on the multiscale), ``omero`` channels where it has a ``c`` axis,
    and ground truth ``labels/ground_truth`` with the image's axes (``c`` of length 1): the old
    layout of label images, which every reader must still take."""
    shape = LAYOUTS[axes]
    sizes = dict(zip(axes, shape, strict=True))
    spatial = tuple(sizes[a] for a in "zyx" if a in sizes)
    spec = SimulationSpec(frames=sizes.get("t", 1), shape=spatial, diameter=16.0, seed=3)
    raws, truths = zip(*[(raw, truth) for raw, truth, _ in simulate_frames(spec)], strict=True)
    raw, truth = np.stack(raws), np.stack(truths)  # (t, *spatial)
    if "c" in axes:  # a second, dimmer channel of the same nuclei
        raw = np.stack([raw, (raw // 2).astype(raw.dtype)], axis=1)
        truth = truth[:, None]
    if "t" not in axes:
        raw, truth = raw[0], truth[0]
    assert raw.shape == shape
    root = zarr.open_group(str(path), mode="w")
    extra = {"omero": LAYOUT_OMERO} if "c" in axes else {}
    ome_write_image(
        raw,
        root,
        axes=list(axes),
        scale={a: LAYOUT_SCALE[a] if a != "c" else 1.0 for a in axes},
        axes_units={a: LAYOUT_UNITS[a] for a in axes if a != "c"},
        scale_factors=(2,),
        **extra,
    )
    ome_write_labels(truth.astype(np.uint32), root, name="ground_truth", axes=list(axes))
    attrs = root.attrs.asdict()
    if "c" in axes:
        del attrs["ome"]["omero"]["channels"][1]["window"]
    attrs["ome"]["multiscales"][0]["coordinateTransformations"] = [
        {"type": "scale", "scale": [1.0] * len(axes)},
        {"type": "translation", "translation": [LAYOUT_TRANSLATION.get(a, 0.0) for a in axes]},
    ]
    root.attrs.put(attrs)
    return path


@pytest.fixture(scope="session")
def layout_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``layout_store(axes)``: the input of :func:`write_layout` for ``axes`` (one of
    :data:`LAYOUTS`), written once per session. Read-only."""
    made: dict[str, Path] = {}

    def get(axes: str) -> Path:
        if axes not in made:
            folder = tmp_path_factory.mktemp(f"layout_{axes}")
            made[axes] = write_layout(folder / f"{axes}.zarr", axes)
        return made[axes]

    return get


@pytest.fixture(scope="session")
def predicted_layout(
    tmp_path_factory: pytest.TempPathFactory,
    layout_store: Callable[[str], Path],
    run_cli: Callable[..., subprocess.CompletedProcess[str]],
) -> Callable[[str], Path]:
    """``predicted_layout(axes)``: the output of ``cellulus-scale predict --method watershed``
    on ``layout_store(axes)``, computed once per session. Read-only."""
    made: dict[str, Path] = {}

    def get(axes: str) -> Path:
        if axes not in made:
            out = tmp_path_factory.mktemp(f"predicted_{axes}") / "out.zarr"
            result = run_cli(
                "predict", layout_store(axes), out, "--method", "watershed", "--diameter", "16",
                "--workers", "1",
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            made[axes] = out
        return made[axes]

    return get


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """A command refused bad input: exit code 2, one line on stderr naming the problem and the
    fix ("Error: problem; fix"), no traceback, every one of ``words`` in it; the line."""
    assert result.returncode == 2, (result.returncode, result.stderr, result.stdout)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and "; " in lines[0], lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def client():
    """A local Dask cluster of 2 single-threaded workers, shared by a test module."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    )
    with Client(cluster) as dask:
        yield dask
    cluster.close()


def image_digest(path: Path) -> str:
    """The hash of every file of an image store outside its ``labels`` group (the image's
    arrays and metadata), to check that writing labels into it changed nothing else."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if relative.parts[0] != "labels":
            digest.update(str(relative).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def tree_digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (or of ``path`` itself), keyed by relative path."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(path.rglob("*"))
        if file.is_file()
    }


@pytest.fixture
def digest() -> Callable[[Path], dict[str, str]]:
    """``digest(path)``: hashes of all files of a store, to check that it was not changed."""
    return tree_digest


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "cellulus-scale"
    if script.exists():
        return [str(script)]
    found = shutil.which("cellulus-scale")
    if found:
        return [found]
    return [sys.executable, "-m", "cellulus_scale.cli.main"]


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_cli(*args, cwd=None)``: run the installed ``cellulus-scale`` in a subprocess."""
    command = _console_script()

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=120,
        )

    return run


@pytest.fixture
def cli_runner() -> CliRunner:
    """A click ``CliRunner`` that keeps stderr apart from stdout (any click version)."""
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()  # click >= 8.2: result.stderr is always separate
