"""Shared, generic test fixtures: a small simulated OME-Zarr store and CLI helpers."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation

#: The spec of the session-scoped ``simulated_store``: 2D + t, small and quick to write.
SMALL_SPEC = SimulationSpec(frames=4, shape=(128, 128), diameter=16.0, seed=7)


@pytest.fixture(scope="session")
def simulated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated NGFF 0.4 store (axes tyx, ``labels/ground_truth``). Read-only: do
    not modify it; copy it (``shutil.copytree``) where a test needs to write."""
    path = tmp_path_factory.mktemp("simulated") / "small.zarr"
    return write_simulation(path, SMALL_SPEC)


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
