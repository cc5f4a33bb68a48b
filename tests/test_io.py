"""OME-Zarr input and output (``cellulus_scale.io.ome_zarr``) and the CLI's refusal of bad input."""

from __future__ import annotations

import json
import shutil

import dask.array as da
import numpy as np
import pytest
import zarr
from cellulus_scale.cli.main import main
from ome_zarr.format import FormatV04
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader
from ome_zarr.scale import Methods, method_dispatch
from ome_zarr.writer import write_image as ome_write_image
from ome_zarr.writer import write_labels as ome_write_labels
from ome_zarr_models.v04 import Image, ImageLabel, Labels

from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr as ome_io

SHAPES = {
    "yx": (128, 128),
    "tyx": (3, 128, 128),
    "tcyx": (2, 2, 128, 128),
    "tzyx": (2, 3, 128, 128),
}


def make_image(axes, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, SHAPES[axes]).astype(np.uint16)


def make_labels(axes, seed=0):
    """Blocky instance labels (with a channel axis of length 1 where the image has one)."""
    shape = tuple(1 if a == "c" else s for a, s in zip(axes, SHAPES[axes], strict=True))
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 40, shape[:-2] + (shape[-2] // 8, shape[-1] // 8))
    coarse[coarse < 10] = 0
    return np.repeat(np.repeat(coarse, 8, axis=-2), 8, axis=-1).astype(np.uint32)


def ome_zarr_py_store(path, axes, fmt=None, scale=None):
    """Image + labels 'gt' written by ome-zarr-py itself (zarr 3 defaults: NGFF 0.5)."""
    image, labels = make_image(axes), make_labels(axes)
    if fmt is None:
        root = zarr.open_group(str(path), mode="w")
    else:
        root = zarr.open_group(str(path), mode="w", zarr_format=2)
    kwargs = {} if fmt is None else {"fmt": fmt}
    ome_write_image(image, root, axes=axes, scale=scale, **kwargs)
    ome_write_labels(labels, root, name="gt", axes=axes, **kwargs)
    return image, labels


# --- reading ome-zarr-py's stores: NGFF 0.5 (zarr v3) and 0.4 (zarr v2) -------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("axes", list(SHAPES))
def test_open_ngff_05_written_by_ome_zarr_py(tmp_path, axes):
    path = tmp_path / "v05.zarr"
    scale = {"y": 0.5, "x": 0.25}
    image, labels = ome_zarr_py_store(path, axes, scale=scale)
    assert (path / "zarr.json").exists() and not (path / ".zattrs").exists()
    assert json.loads((path / "zarr.json").read_text())["attributes"]["ome"]["version"] == "0.5"

    opened = ome_io.open_image(path)
    assert opened.ngff_version == "0.5"
    assert opened.axes == axes
    assert isinstance(opened.data, da.Array)
    assert opened.data.shape == image.shape and opened.data.dtype == image.dtype
    expected_scale = tuple(scale.get(a, 1.0) for a in axes)
    assert opened.scale == pytest.approx(expected_scale)
    assert opened.labels == ("gt",)
    np.testing.assert_array_equal(opened.data.compute(), image)

    truth = ome_io.open_labels(path, "gt")
    assert truth.axes == axes
    np.testing.assert_array_equal(truth.data.compute(), labels)

    canonical = opened.canonical()
    assert canonical.ndim == 5 and canonical.shape == opened.canonical_shape
    assert opened.spatial_dims == (3 if "z" in axes else 2)


@pytest.mark.parametrize("axes", ["tyx", "tcyx"])
def test_open_ngff_04_written_by_ome_zarr_py(tmp_path, axes):
    path = tmp_path / "v04.zarr"
    image, labels = ome_zarr_py_store(path, axes, fmt=FormatV04())
    opened = ome_io.open_image(path)
    assert (opened.ngff_version, opened.axes, opened.labels) == ("0.4", axes, ("gt",))
    np.testing.assert_array_equal(opened.data.compute(), image)
    np.testing.assert_array_equal(ome_io.open_labels(path, "gt").data.compute(), labels)


def test_open_is_lazy_and_read_only(simulated_store, digest):
    before = digest(simulated_store)
    opened = ome_io.open_image(simulated_store)
    assert isinstance(opened.data, da.Array)
    level0 = zarr.open_group(str(simulated_store), mode="r")["0"]
    assert opened.data.chunksize == level0.chunks  # Dask chunks follow the zarr chunks
    assert opened.axes == "tyx" and opened.ngff_version == "0.4"
    assert opened.scale == (1.0, 1.0, 1.0)
    opened.data[1].sum().compute()
    assert digest(simulated_store) == before


def test_open_with_matching_axes_and_scale_of_multiscale(tmp_path):
    path = tmp_path / "img.zarr"
    ome_io.write_image(path, da.from_array(make_image("tyx")), "tyx", (2.0, 0.5, 0.5), "img")
    root = zarr.open_group(str(path), mode="r+")
    attrs = root.attrs.asdict()
    attrs["multiscales"][0]["coordinateTransformations"] = [
        {"type": "scale", "scale": [1.0, 2.0, 2.0]}
    ]
    root.attrs.put(attrs)
    opened = ome_io.open_image(path, axes="TYX")
    assert opened.scale == (2.0, 1.0, 1.0)
    with pytest.raises(UserInputError, match="does not match"):
        ome_io.open_image(path, axes="cyx")


# --- round trip: written by us (NGFF 0.4), validated, read back -------------------------


@pytest.mark.parametrize("axes", list(SHAPES))
def test_round_trip_image_and_labels(tmp_path, axes):
    path = tmp_path / "round.zarr"
    image, labels = make_image(axes), make_labels(axes)
    scale = tuple(0.5 if a in "yx" else 1.0 for a in axes)
    chunks = tuple(1 if a in "tcz" else 64 for a in axes)
    root = ome_io.write_image(path, da.from_array(image, chunks=chunks), axes, scale, "round")
    ome_io.write_labels(root, "gt", da.from_array(labels, chunks=chunks), axes, scale)
    ome_io.write_labels(root, "other", da.from_array(labels[..., ::-1], chunks=chunks), axes, scale)

    root = zarr.open_group(str(path), mode="r")
    assert Image.from_zarr(root).attributes.multiscales[0].datasets[0].path == "0"
    assert set(Labels.from_zarr(root["labels"]).attributes.labels) == {"gt", "other"}
    for name in ("gt", "other"):
        label_image = ImageLabel.from_zarr(root["labels"][name])
        axes_meta = "".join(a.name for a in label_image.attributes.multiscales[0].axes)
        assert axes_meta == axes
    nodes = list(Reader(parse_url(str(path)))())
    found = {n.metadata.get("name") for n in nodes if any(isinstance(s, Label) for s in n.specs)}
    assert found == {"gt", "other"}

    opened = ome_io.open_image(path)
    assert (opened.axes, opened.scale, opened.ngff_version) == (axes, scale, "0.4")
    assert set(opened.labels) == {"gt", "other"}
    np.testing.assert_array_equal(opened.data.compute(), image)
    truth = ome_io.open_labels(path, "gt")
    assert (truth.axes, truth.scale) == (axes, scale)
    np.testing.assert_array_equal(truth.data.compute(), labels)
    # label images made for this image drop its channel axis (README, "Data layout")
    no_c = tuple(s for a, s in zip(axes, image.shape, strict=True) if a != "c")
    assert ome_io.label_axes_shape(opened) == (axes.replace("c", ""), no_c)

    # Pyramids: 2x in y and x only; the image's anti-aliased with ome-zarr-py's own resize
    # (chunk by chunk), the labels' by taking pixels (no new label values).
    resize = method_dispatch[Methods.RESIZE]
    for group, base, kind in ((root, image, "resize"), (root["labels"]["gt"], labels, "nearest")):
        multiscale = group.attrs["multiscales"][0]
        assert multiscale["type"] == kind
        datasets = multiscale["datasets"]
        assert [d["path"] for d in datasets] == ["0", "1"]  # 128 -> 64, then stop
        level1 = group["1"][...]
        if kind == "nearest":
            np.testing.assert_array_equal(level1, base[..., ::2, ::2])
        else:
            half = tuple(s // 2 if a in "yx" else s for a, s in zip(axes, base.shape, strict=True))
            expected = resize["func"](da.from_array(base, chunks=chunks), half, **resize["kwargs"])
            np.testing.assert_array_equal(level1, expected.compute())
            assert np.abs(level1.astype(float) - base[..., ::2, ::2]).mean() > 100  # smoothed
        factor = [d["coordinateTransformations"][0]["scale"] for d in datasets]
        assert factor[1] == [s * (2 if a in "yx" else 1) for s, a in zip(scale, axes, strict=True)]
        # an anti-aliased level's first pixel is centred on the first 2x2 pixels it averages
        shift = [d["coordinateTransformations"][1:] for d in datasets]
        if kind == "nearest":
            assert shift == [[], []]
        else:
            half_pixel = [0.25 if a in "yx" else 0.0 for a in axes]
            assert shift == [[], [{"type": "translation", "translation": half_pixel}]]
    assert set(np.unique(root["labels"]["gt"]["1"][...])) <= set(np.unique(labels))


def test_label_pyramid_is_nearest_for_many_levels(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 1000, (2, 512, 256)).astype(np.uint32)
    root = ome_io.write_image(
        str(tmp_path / "big.zarr"), da.zeros(labels.shape, np.uint8, chunks=(1, 128, 128)), "tyx",
        (1, 1, 1), "big",
    )  # fmt: skip
    ome_io.write_labels(root, "gt", da.from_array(labels, chunks=(1, 100, 100)), "tyx", (1, 1, 1))
    group = zarr.open_group(str(tmp_path / "big.zarr"), mode="r")["labels"]["gt"]
    assert [d["path"] for d in group.attrs["multiscales"][0]["datasets"]] == ["0", "1", "2"]
    values = set(np.unique(labels).tolist())
    for k in (1, 2):
        lower = group[str(k)][...]
        np.testing.assert_array_equal(lower, labels[..., :: 2**k, :: 2**k])
        assert set(np.unique(lower).tolist()) <= values
    ImageLabel.from_zarr(group)


def test_simulated_store_validates(simulated_store):
    root = zarr.open_group(str(simulated_store), mode="r")
    Image.from_zarr(root)
    Labels.from_zarr(root["labels"])
    ImageLabel.from_zarr(root["labels"]["ground_truth"])
    nodes = list(Reader(parse_url(str(simulated_store)))())
    assert any(
        n.metadata.get("name") == "ground_truth" and any(isinstance(s, Label) for s in n.specs)
        for n in nodes
    )


# --- plain zarr arrays and bad input at the library level --------------------------------


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_array_needs_and_takes_axes(tmp_path, zarr_format):
    path = tmp_path / "plain.zarr"
    data = make_image("tyx")
    array = zarr.create_array(
        str(path), shape=data.shape, dtype=data.dtype, chunks=(1, 64, 64), zarr_format=zarr_format
    )
    array[...] = data
    with pytest.raises(UserInputError, match="--axes"):
        ome_io.open_image(path)
    opened = ome_io.open_image(path, axes="tyx")
    assert (opened.axes, opened.scale, opened.ngff_version) == ("tyx", (1.0, 1.0, 1.0), None)
    np.testing.assert_array_equal(opened.data.compute(), data)
    with pytest.raises(UserInputError, match="3 dimensions"):
        ome_io.open_image(path, axes="tzyx")
    for bad in ("xyt", "tqx", "tyy", "ty", ""):
        with pytest.raises(UserInputError):
            ome_io.open_image(path, axes=bad)


def test_group_without_metadata(tmp_path):
    path = tmp_path / "group.zarr"
    group = zarr.open_group(str(path), mode="w")
    with pytest.raises(UserInputError, match="multiscales"):
        ome_io.open_image(path)
    group.create_array("0", shape=(2, 32, 32), dtype="uint8")
    with pytest.raises(UserInputError, match="multiscales"):
        ome_io.open_image(path)
    assert ome_io.open_image(path, axes="tyx").data.shape == (2, 32, 32)


@pytest.mark.parametrize("dtype", ["complex64", "bool"])
def test_unsupported_dtype(tmp_path, dtype):
    path = tmp_path / "odd.zarr"
    zarr.create_array(str(path), shape=(2, 32, 32), dtype=dtype)
    with pytest.raises(UserInputError, match=dtype):
        ome_io.open_image(path, axes="tyx")


def test_missing_and_non_zarr_paths(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        ome_io.open_image(tmp_path / "missing.zarr")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserInputError, match="not a readable zarr"):
        ome_io.open_image(tmp_path / "folder")


def test_missing_label_name(simulated_store):
    with pytest.raises(UserInputError, match="ground_truth"):
        ome_io.open_labels(simulated_store, "cellulus")


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda m: m.update(datasets=[]),
        lambda m: m.update(datasets=[{"path": "nope"}]),
        lambda m: m["datasets"][0].update(
            coordinateTransformations=[{"type": "scale", "scale": [1.0]}]
        ),
        lambda m: m.update(axes=["t", "x", "y"]),
    ],
)
def test_malformed_metadata_is_a_user_error(tmp_path, simulated_store, corrupt):
    path = tmp_path / "broken.zarr"
    shutil.copytree(simulated_store, path)
    root = zarr.open_group(str(path), mode="r+")
    attrs = root.attrs.asdict()
    corrupt(attrs["multiscales"][0])
    root.attrs.put(attrs)
    with pytest.raises(UserInputError):
        ome_io.open_image(path)


def test_check_output_path(tmp_path, simulated_store):
    existing = tmp_path / "out.zarr"
    existing.mkdir()
    with pytest.raises(UserInputError, match="--overwrite"):
        ome_io.check_output_path(existing, overwrite=False)
    assert ome_io.check_output_path(existing, overwrite=True) == existing
    with pytest.raises(UserInputError, match="is the input"):
        ome_io.check_output_path(simulated_store, overwrite=True, inputs=[simulated_store])
    with pytest.raises(UserInputError, match="does not exist"):
        ome_io.check_output_path(tmp_path / "no" / "out.zarr", overwrite=False)
    assert existing.exists()


# --- bad input through the command line ------------------------------------------------


def assert_refused(exit_code, stderr, output, *words):
    """Exit code 2, one line on stderr naming problem and fix, no traceback."""
    assert exit_code == 2, (exit_code, stderr, output)
    assert "Traceback" not in stderr and "Traceback" not in output
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and "; " in lines[0], lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


def test_missing_input_end_to_end(tmp_path, run_cli):
    result = run_cli("train", "missing.zarr", "m.pt", cwd=tmp_path)
    assert_refused(result.returncode, result.stderr, result.stdout, "missing.zarr", "no such")
    result = run_cli("evaluate", "missing.zarr", cwd=tmp_path)
    assert_refused(result.returncode, result.stderr, result.stdout, "missing.zarr", "no such")
    assert list(tmp_path.iterdir()) == []


def test_wrong_axes_end_to_end(tmp_path, run_cli, digest):
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(3, 40, 40), dtype="uint16")[...] = 7
    before = digest(tmp_path / "plain.zarr")
    result = run_cli("train", "plain.zarr", "m.pt", "--axes", "tzyx", cwd=tmp_path)
    assert_refused(result.returncode, result.stderr, result.stdout, "tzyx", "3 dimensions")
    assert not (tmp_path / "m.pt").exists()
    assert digest(tmp_path / "plain.zarr") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.zarr"]


def _group_without_metadata(path):
    group = zarr.open_group(str(path), mode="w")
    group.create_array("data", shape=(2, 32, 32), dtype="uint16")
    group.attrs["note"] = "not an image"


def _plain(dtype):
    def write(path):
        zarr.create_array(str(path), shape=(2, 48, 48), dtype=dtype)[...] = 1

    return write


@pytest.mark.parametrize(
    ("make", "args", "words"),
    [
        (_group_without_metadata, [], ["multiscales", "--axes"]),
        (_plain("uint16"), [], ["--axes"]),
        (_plain("uint16"), ["--axes", "tzyx"], ["3 dimensions"]),
        (_plain("uint16"), ["--axes", "abc"], ["--axes"]),
        (_plain("complex64"), ["--axes", "tyx"], ["complex64"]),
        (_plain("bool"), ["--axes", "tyx"], ["bool"]),
    ],
)
def test_bad_input_refused_by_train(tmp_path, cli_runner, digest, make, args, words):
    source = tmp_path / "input.zarr"
    make(source)
    before = digest(source)
    model = tmp_path / "m.pt"
    result = cli_runner.invoke(main, ["train", str(source), str(model), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert_refused(result.exit_code, result.stderr, result.output, *words)
    assert not model.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.zarr"]
    assert digest(source) == before


@pytest.mark.parametrize("dtype", ["complex64", "bool"])
def test_bad_dtype_end_to_end(tmp_path, run_cli, digest, dtype):
    _plain(dtype)(tmp_path / "odd.zarr")
    before = digest(tmp_path / "odd.zarr")
    result = run_cli("train", "odd.zarr", "m.pt", "--axes", "tyx", cwd=tmp_path)
    assert_refused(result.returncode, result.stderr, result.stdout, dtype)
    assert not (tmp_path / "m.pt").exists()
    assert digest(tmp_path / "odd.zarr") == before


def test_plain_array_refused_by_evaluate(tmp_path, cli_runner, digest):
    _plain("uint32")(tmp_path / "plain.zarr")
    before = digest(tmp_path / "plain.zarr")
    result = cli_runner.invoke(main, ["evaluate", str(tmp_path / "plain.zarr")])
    assert_refused(result.exit_code, result.stderr, result.output, "plain zarr array")
    assert digest(tmp_path / "plain.zarr") == before


def test_group_without_metadata_refused_by_other_commands(tmp_path, cli_runner, digest):
    source = tmp_path / "group.zarr"
    _group_without_metadata(source)
    before = digest(source)
    out = tmp_path / "out.zarr"
    for args in (
        ["predict", source, out, "--method", "watershed", "--diameter", "10"],
        ["evaluate", source],
        ["preview", source, "-o", tmp_path / "p.png"],
    ):
        result = cli_runner.invoke(main, [str(a) for a in args])
        assert_refused(result.exit_code, result.stderr, result.output, "multiscales")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["group.zarr"]
    assert digest(source) == before
