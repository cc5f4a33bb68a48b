"""The output of ``predict`` for the layouts users bring (``tyx``, ``tcyx``, ``tzyx``,
``czyx``), through the command line: label images without the ``c`` axis, the input's metadata
carried (units, scale, translation, ``omero`` channels), anti-aliased image pyramids and nearest
label pyramids, NGFF 0.4 that validates, and every reader of the labels still working."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from conftest import (
    LAYOUT_OMERO,
    LAYOUT_SCALE,
    LAYOUT_TRANSLATION,
    LAYOUT_UNITS,
    LAYOUTS,
    assert_one_line_error,
)
from ome_zarr_models.v04 import Image, ImageLabel, Labels

from cellulus_scale.io import ome_zarr as ome_io


def _transforms(multiscale, level):
    return {
        t["type"]: t[t["type"]] for t in multiscale["datasets"][level]["coordinateTransformations"]
    }


@pytest.fixture(scope="module", params=list(LAYOUTS))
def predicted(request, layout_store, predicted_layout):
    """(axes, input, output) of ``predict --method watershed`` on a layout."""
    return request.param, layout_store(request.param), predicted_layout(request.param)


def test_labels_drop_the_channel_axis_and_validate(predicted):
    axes, source, out = predicted
    root = zarr.open_group(str(out), mode="r")
    Image.from_zarr(root)
    assert Labels.from_zarr(root["labels"]).attributes.labels == ["cellulus"]
    ImageLabel.from_zarr(root["labels"]["cellulus"])

    image = ome_io.open_image(out)
    labels = ome_io.open_labels(out, "cellulus")
    no_c = axes.replace("c", "")
    assert (image.axes, image.data.shape) == (axes, LAYOUTS[axes])
    assert labels.axes == no_c
    assert labels.data.shape == tuple(
        s for a, s in zip(axes, LAYOUTS[axes], strict=True) if a != "c"
    )
    assert labels.data.max().compute() > 0
    np.testing.assert_array_equal(image.data.compute(), ome_io.open_image(source).data.compute())


def test_metadata_is_carried(predicted):
    axes, _, out = predicted
    root = zarr.open_group(str(out), mode="r")
    for group, group_axes in ((root, axes), (root["labels"]["cellulus"], axes.replace("c", ""))):
        multiscale = group.attrs["multiscales"][0]
        named = [a["name"] for a in multiscale["axes"]]
        assert "".join(named) == group_axes
        assert [a.get("unit") for a in multiscale["axes"]] == [LAYOUT_UNITS.get(a) for a in named]
        level0 = _transforms(multiscale, 0)
        assert level0["scale"] == [LAYOUT_SCALE[a] if a != "c" else 1.0 for a in named]
        assert level0["translation"] == [LAYOUT_TRANSLATION.get(a, 0.0) for a in named]
        # the pyramids: anti-aliased image (its pixel centres shift by half a pixel of the
        # full resolution per halving), nearest labels (first pixel kept)
        level1 = _transforms(multiscale, 1)
        assert level1["scale"] == [
            s * (2 if a in "yx" else 1) for s, a in zip(level0["scale"], named, strict=True)
        ]
        image_pyramid = group is root
        assert multiscale["type"] == ("resize" if image_pyramid else "nearest")
        half = [
            0.5 * s if a in "yx" and image_pyramid else 0.0
            for s, a in zip(level0["scale"], named, strict=True)
        ]
        assert level1["translation"] == pytest.approx(
            [t + h for t, h in zip(level0["translation"], half, strict=True)]
        )
    opened = ome_io.open_image(out)
    assert opened.units == tuple(LAYOUT_UNITS.get(a) for a in axes)
    assert opened.translation == tuple(LAYOUT_TRANSLATION.get(a, 0.0) for a in axes)

    if "c" in axes:
        channels = root.attrs["omero"]["channels"]
        given = LAYOUT_OMERO["channels"]
        assert [c["label"] for c in channels] == [c["label"] for c in given]
        assert [c["color"] for c in channels] == [c["color"] for c in given]
        assert channels[0]["window"] == given[0]["window"]
        # the window the input lacked: the channel's range, read on the smallest level
        window = channels[1]["window"]
        smallest = zarr.open_array(str(out / "1"), mode="r")[:, 1] if axes[0] == "t" else None
        if smallest is not None:
            assert (window["start"], window["end"]) == (smallest.min(), smallest.max())
        assert window["min"] == window["start"] < window["end"] == window["max"]
    else:
        assert "omero" not in root.attrs

    # few objects: every ID has an image-label colour
    label_attrs = root["labels"]["cellulus"].attrs["image-label"]
    objects = ome_io.run_status(out)["objects"]
    assert [c["label-value"] for c in label_attrs["colors"]] == list(range(1, objects + 1))
    assert len(json.dumps(label_attrs)) < 60 * objects + 200


def test_readers_of_the_labels_take_both_layouts(predicted, tmp_path, run_cli):
    """evaluate (against ground truth that keeps ``c``), preview and the StarDist training's
    label crops read the labels without ``c``."""
    axes, source, out = predicted
    scores = tmp_path / "scores.json"
    result = run_cli("evaluate", out, "--truth", source, "--json", scores)
    assert result.returncode == 0, result.stderr
    assert json.loads(scores.read_text())["overall"]["f1"] > 0.5
    if "t" in axes:
        png = tmp_path / "frame.png"
        result = run_cli("preview", out, "--frame", "1", "-o", png)
        assert result.returncode == 0 and png.stat().st_size > 0, result.stderr

    from cellulus_scale.kernels.normalisation import Normalisation
    from cellulus_scale.training.crops import LabelledCrops, check_labels_match

    image = ome_io.open_image(out)
    labels = ome_io.open_labels(out, "cellulus")
    check_labels_match(image, labels, "cellulus")
    size = 48 if image.spatial_dims == 2 else 16
    crops = LabelledCrops(image, labels, size, 4, Normalisation(0.0, 1000.0), 0, 1, n_rays=8)
    crop, probability, _, _ = crops[0]
    assert crop.shape[0] == image.canonical_shape[1]
    assert probability.shape == (size - 8,) * image.spatial_dims


def test_diameter_in_physical_units(layout_store, simulated_store, tmp_path, run_cli):
    """--diameter-unit: a diameter in micrometres becomes in-plane pixels through the image's
    NGFF scale and unit (0.5 micrometer per pixel: 8 micrometres are 16 px), through the CLI
    end to end; the library converts any NGFF space unit and takes --voxel-size in that unit;
    an image without units, an unknown unit and a unit without a diameter are refused."""
    store = layout_store("tzyx")
    out = tmp_path / "out.zarr"
    result = run_cli(
        "predict", store, out, "--method", "watershed", "--diameter", "8",
        "--diameter-unit", "micrometer", "--workers", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert ome_io.run_status(out)["diameter"] == pytest.approx(8 / LAYOUT_SCALE["x"])
    image = ome_io.open_image(store)
    assert ome_io.diameter_in_pixels(image, 8000, "nanometer") == pytest.approx(16.0)
    assert ome_io.diameter_in_pixels(image, 8, "micrometer", (2.0, 0.25, 0.25)) == 32.0
    plain = run_cli(
        "predict", simulated_store, tmp_path / "p.zarr", "--method", "watershed",
        "--diameter", "8", "--diameter-unit", "micrometer",
    )  # fmt: skip
    assert_one_line_error(plain, "no unit", "--diameter in pixels")
    unknown = run_cli(
        "predict", store, tmp_path / "u.zarr", "--method", "watershed", "--diameter", "8",
        "--diameter-unit", "microns",
    )  # fmt: skip
    assert_one_line_error(unknown, "unknown --diameter-unit", "micrometer")
    alone = run_cli("predict", store, tmp_path / "a.zarr", "--diameter-unit", "micrometer")
    assert_one_line_error(alone, "needs --diameter")
    assert not any((tmp_path / name).exists() for name in ("p.zarr", "u.zarr", "a.zarr"))
