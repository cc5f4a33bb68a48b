"""The package's shape: the public functions, a light package import, every subpackage installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import cellulus_scale

ROOT = Path(__file__).resolve().parents[1]


def test_public_functions_import_from_the_package_without_torch_or_dask() -> None:
    code = (
        "import sys, cellulus_scale\n"
        "heavy = [m for m in ('torch', 'dask', 'distributed', 'zarr') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from cellulus_scale import predict, train, train_supervised, evaluate\n"
        "from cellulus_scale import write_simulation, preview_frame, run_demo, SimulationSpec\n"
        "print(predict.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cellulus_scale.workflows.predict"
    assert set(cellulus_scale.__all__) == {"__version__", *cellulus_scale._PUBLIC}
    with pytest.raises(AttributeError):
        cellulus_scale.no_such_function  # noqa: B018


def test_every_subpackage_is_installed() -> None:
    tomllib = pytest.importorskip("tomllib")
    with (ROOT / "pyproject.toml").open("rb") as handle:
        listed = set(tomllib.load(handle)["tool"]["setuptools"]["packages"])
    package = ROOT / "cellulus_scale"
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in package.rglob("__init__.py")}
    assert found | {"cellulus_scale.cli"} == listed
