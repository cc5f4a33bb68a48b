"""``predict`` outputs in a real napari viewer, through napari-ome-zarr's reader: the image and
the labels layers are there, have the same axes, scale and translation, and the sliders (time,
and z) move them together, for ``tyx``, ``tcyx`` (2 channels), ``tzyx`` and ``czyx`` inputs.

napari needs an OpenGL context: this runs ``tests/napari_probe.py`` in a subprocess on an Xvfb
display rendered by Mesa (Qt's ``offscreen`` platform fails inside vispy). It needs the
``viewer`` extra (``pip install -e '.[viewer]'``) and Debian's ``xvfb`` with Mesa's GL
libraries (``.ci/run`` installs both); where either is missing the tests skip, saying which,
unless ``CELLULUS_SCALE_VIEWER=required`` (set by ``.ci/run`` once both installed), where they
fail instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import LAYOUT_OMERO, LAYOUT_SCALE, LAYOUT_UNITS, LAYOUTS
from matplotlib.image import imread

from cellulus_scale.io import ome_zarr as ome_io

PROBE = Path(__file__).with_name("napari_probe.py")
REQUIRED = os.environ.get("CELLULUS_SCALE_VIEWER") == "required"
OLD_LAYOUT = "tcyx, labels with c"  # the layout before: labels/cellulus kept a c of length 1
NGFF05 = "tcyx, NGFF 0.5"  # predict --ngff 0.5 (zarr v3, sharded)


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (CELLULUS_SCALE_VIEWER=required)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def display():
    """An Xvfb display (Mesa renders OpenGL), for the module's viewers."""
    missing = [m for m in ("napari", "napari_ome_zarr") if importlib.util.find_spec(m) is None]
    if missing:
        _unavailable(f"{' and '.join(missing)} not installed: pip install -e '.[viewer]'")
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        _unavailable(
            "Xvfb not found, and napari needs an OpenGL context: apt-get install xvfb libgl1"
            " libegl1 (Mesa), or run bash .ci/run"
        )
    read, write = os.pipe()
    server = subprocess.Popen(
        [xvfb, "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    if not number:
        server.kill()
        _unavailable("Xvfb did not start")
    try:
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _old_layout(source: Path, target: Path) -> Path:
    """A copy of an output whose labels keep a ``c`` of length 1 (as before this layout)."""
    shutil.copytree(source, target)
    root = zarr.open_group(str(target), mode="r+")
    labels = ome_io.open_labels(target, "cellulus")
    shutil.rmtree(target / "labels")
    axes = "tcyx"
    ome_io.write_labels(root, "cellulus", labels.data[:, None], axes, (30.0, 1.0, 0.5, 0.5))
    return target


@pytest.fixture(scope="module")
def reports(display, predicted_layout, layout_store, run_cli, tmp_path_factory):
    """The probe's report on each layout's output (one viewer per store, one process), and the
    screenshot of the ``tcyx`` one at frame 1."""
    folder = tmp_path_factory.mktemp("napari")
    stores = {axes: predicted_layout(axes) for axes in ("tcyx", "tyx", "tzyx", "czyx")}
    stores[OLD_LAYOUT] = _old_layout(stores["tcyx"], folder / "old.zarr")
    stores[NGFF05] = folder / "ngff05.zarr"
    done = run_cli(
        "predict", layout_store("tcyx"), stores[NGFF05], "--method", "watershed",
        "--diameter", "16", "--workers", "1", "--ngff", "0.5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    output = folder / "report.json"
    shot = folder / "napari.png"
    env = {**os.environ, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb"}
    env.pop("WAYLAND_DISPLAY", None)
    command = [sys.executable, str(PROBE), *map(str, stores.values()), "--json", str(output)]
    command += ["--screenshot", str(shot), "--frame", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(output.read_text())
    named = zip(stores.items(), found, strict=True)
    return {axes: (store, report) for (axes, store), report in named}, shot


def _follows(report, layer, axis):
    """The layer's own axis under the viewer's slider ``axis`` (layers align from the right),
    or None."""
    own = axis - (report["dims"]["ndim"] - layer["ndim"])
    return own if own >= 0 else None


@pytest.mark.parametrize("axes", list(LAYOUTS))
def test_image_and_labels_layers_match(reports, axes):
    store, report = reports[0][axes]
    layers = report["layers"]
    images = [layer for layer in layers if layer["kind"] == "Image"]
    labels = [layer for layer in layers if layer["kind"] == "Labels"]
    channels = 2 if "c" in axes else 1
    assert (len(images), len(labels)) == (channels, 1), [layer["name"] for layer in layers]
    if "c" in axes:  # one layer per channel, named after the omero channels
        names = [c["label"] for c in LAYOUT_OMERO["channels"]]
        assert [image["name"].split(": ")[-1] for image in images] == names
    shown = axes.replace("c", "")
    shape = [s for a, s in zip(axes, LAYOUTS[axes], strict=True) if a != "c"]
    assert report["dims"]["axis_labels"] == list(shown)
    for layer in layers:
        assert layer["ndim"] == len(shown) and layer["shape"] == shape, layer
        assert layer["axis_labels"] == list(shown), layer
        assert layer["units"] == [LAYOUT_UNITS[a] for a in shown], layer
        assert layer["world_pixel"] == [LAYOUT_SCALE[a] for a in shown], layer  # the scale
        assert layer["levels"] == 2
    # the same translation for all (napari-ome-zarr 0.10 reads only the first transformation of
    # a dataset, its scale, so the translation is 0 for the image and the labels alike)
    assert len({tuple(layer["world_origin"]) for layer in layers}) == 1


@pytest.mark.parametrize("axes", list(LAYOUTS))
def test_sliders_move_image_and_labels_together(reports, axes):
    """At every step of every slider, every layer shows the data of that step: the values
    napari shows at sample points equal the stored arrays' there."""
    store, report = reports[0][axes]
    image = np.asarray(zarr.open_array(str(store / "0"), mode="r"))
    labels = np.asarray(zarr.open_array(str(store / "labels" / "cellulus" / "0"), mode="r"))
    sliders = set()
    seen_labels: dict[int, set] = {}
    images = [layer["name"] for layer in report["layers"] if layer["kind"] == "Image"]
    for entry in report["slices"]:
        axis, step = entry["axis"], entry["step"]
        sliders.add(axis)
        for name, samples in entry["layers"].items():
            layer = next(layer for layer in report["layers"] if layer["name"] == name)
            own = _follows(report, layer, axis)
            assert own is not None, (name, axis)
            for sample in samples:
                assert sample["level"] == 0
                index = tuple(int(np.round(i)) for i in sample["data_index"])
                assert index[own] == step, (name, axis, step, index)
                if layer["kind"] == "Labels":
                    assert sample["value"] == labels[index], (name, index)
                    seen_labels.setdefault(step if axis == 0 else -1, set()).add(sample["value"])
                else:  # an image layer: one channel of the image
                    full = list(index)
                    if "c" in axes:
                        full.insert(axes.index("c"), images.index(name))
                    assert sample["value"] == image[tuple(full)], (name, full)
    assert sliders == set(range(len(axes.replace("c", "")) - 2))  # t and/or z
    # the labels shown differ between the frames (the check above is not vacuous)
    frames = [values for step, values in seen_labels.items() if step >= 0]
    assert any(values - {0.0} for values in frames)
    if "t" in axes:
        assert len({frozenset(v) for v in frames}) > 1


def test_an_ngff05_output_shows_as_its_ngff04_twin(reports):
    """The same prediction written as NGFF 0.5 (zarr v3, sharded) opens with the same layers,
    axes, units and scale, and shows the same values at every step of every slider."""
    (_, report04), (store05, report05) = reports[0]["tcyx"], reports[0][NGFF05]
    assert zarr.open_group(str(store05), mode="r").metadata.zarr_format == 3
    described = ("kind", "ndim", "shape", "levels", "axis_labels", "units", "world_pixel")
    assert [{k: layer[k] for k in described} for layer in report05["layers"]] == [
        {k: layer[k] for k in described} for layer in report04["layers"]
    ]
    assert report05["slices"] and len(report05["slices"]) == len(report04["slices"])
    for old, new in zip(report04["slices"], report05["slices"], strict=True):
        values = [[s["value"] for s in samples] for samples in old["layers"].values()]
        assert [[s["value"] for s in samples] for samples in new["layers"].values()] == values


def test_labels_with_a_channel_axis_did_not_follow_the_time_slider(reports):
    """The layout before: labels (t, 1, y, x) beside per-channel images (t, y, x). Aligned
    from the right, the labels' t sits on a slider of its own and the image's t on the labels'
    c: the time slider did not move both (the reason the labels drop c)."""
    _, report = reports[0][OLD_LAYOUT]
    assert report["dims"]["ndim"] == 4
    by_kind = {layer["kind"]: layer for layer in report["layers"]}
    label_t = 0 + (report["dims"]["ndim"] - by_kind["Labels"]["ndim"])
    image_t = 0 + (report["dims"]["ndim"] - by_kind["Image"]["ndim"])
    assert label_t != image_t


def test_screenshot_shows_image_and_coloured_labels(reports):
    shot = reports[1]
    rgb = imread(shot)[..., :3]
    assert rgb.shape[0] >= 400 and rgb.shape[1] >= 600
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert (saturation > 0.4).mean() > 0.05  # labels drawn in colour over the image
