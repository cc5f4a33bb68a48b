"""The command line's help and version, and ``cellulus-scale simulate`` end to end."""

from __future__ import annotations

import re

import numpy as np
import pytest
import zarr
from cellulus_scale.cli.main import main
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader
from ome_zarr_models.v04 import Image, ImageLabel, Labels
from scipy import ndimage

from cellulus_scale import __version__
from cellulus_scale.io import ome_zarr as ome_io

GT = "ground_truth"


def assert_user_error(exit_code, stderr, output="", *words):
    """Bad input: exit code 2, one line on stderr naming problem and fix, no traceback."""
    assert exit_code == 2, (exit_code, stderr, output)
    assert "Traceback" not in stderr and "Traceback" not in output
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ")
    assert "; " in lines[0], f"no fix given: {lines[0]}"  # "problem; fix"
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


def invoke(runner, *args):
    result = runner.invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def level(path, index, name=None):
    """Pyramid level ``index`` of the image at ``path`` (or of its label image ``name``)."""
    group = zarr.open_group(str(path), mode="r")
    if name is not None:
        group = group["labels"][name]
    paths = [d["path"] for d in group.attrs["multiscales"][0]["datasets"]]
    return group[paths[index]][...]


def arrays(path):
    return level(path, 0), level(path, 0, GT)


def check_store(path, axes, shape):
    """The image and its ground truth validate, are found by ome-zarr-py's reader, and the
    label pyramid takes pixels (nearest)."""
    root = zarr.open_group(str(path), mode="r")
    image = Image.from_zarr(root)
    assert "".join(a.name for a in image.attributes.multiscales[0].axes) == axes
    labels_group = Labels.from_zarr(root["labels"])
    assert GT in labels_group.attributes.labels
    ImageLabel.from_zarr(root["labels"][GT])
    nodes = list(Reader(parse_url(str(path)))())
    label_nodes = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert [n.metadata.get("name") for n in label_nodes] == [GT]
    assert ome_io.run_status(path)["status"] == "complete"

    opened = ome_io.open_image(path)
    assert (opened.axes, opened.data.shape, opened.labels) == (axes, shape, (GT,))
    truth = ome_io.open_labels(path, GT)
    assert (truth.axes, truth.data.shape) == (axes, shape)

    datasets = root["labels"][GT].attrs["multiscales"][0]["datasets"]
    base = level(path, 0, GT)
    values = set(np.unique(base).tolist())
    for k in range(1, len(datasets)):
        lower = level(path, k, GT)
        np.testing.assert_array_equal(lower, base[..., :: 2**k, :: 2**k])
        assert set(np.unique(lower).tolist()) <= values
    image_levels = root.attrs["multiscales"][0]["datasets"]
    assert len(image_levels) == len(datasets)
    assert root.attrs["multiscales"][0]["type"] == "resize"  # anti-aliased: smooth, same mean
    for k in range(1, len(image_levels)):
        lower, full = level(path, k).astype(float), level(path, 0).astype(float)
        assert lower.shape == full[..., :: 2**k, :: 2**k].shape
        assert abs(lower.mean() - full.mean()) < 0.02 * full.mean() + 1
        assert lower.std() < full[..., :: 2**k, :: 2**k].std()
    return root


# --- help and version --------------------------------------------------------------------


def test_help_and_version(run_cli, cli_runner):
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("simulate", "train", "predict", "evaluate", "preview", "demo"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command
    version = run_cli("--version")
    assert version.returncode == 0
    assert __version__ in version.stdout and "cellulus-scale" in version.stdout
    short = invoke(cli_runner, "-h")
    assert short.exit_code == 0 and "Usage:" in short.stdout
    lines = [line.strip() for line in result.stdout.strip().splitlines()]
    assert lines[-2:] == ["Example:", "cellulus-scale demo demo_output"]


def test_every_subcommand_help_ends_with_an_example(cli_runner):
    assert set(main.commands) >= {"simulate", "train", "predict", "evaluate", "preview", "demo"}
    for name in main.commands:
        result = invoke(cli_runner, name, "--help")
        assert result.exit_code == 0, (name, result.output)
        lines = [line.strip() for line in result.stdout.strip().splitlines()]
        heading = max(i for i, line in enumerate(lines) if line in ("Example:", "Examples:"))
        examples = lines[heading + 1 :]
        assert examples, (name, lines[-3:])
        assert all(line.startswith(f"cellulus-scale {name}") for line in examples), (name, examples)


# --- simulate ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, run_cli):
    """The documented command, run as a user would: ``simulate demo.zarr --frames 5 --shape
    256,256``."""
    where = tmp_path_factory.mktemp("demo")
    result = run_cli("simulate", "demo.zarr", "--frames", "5", "--shape", "256,256", cwd=where)
    assert result.returncode == 0, result.stderr
    assert "demo.zarr" in result.stdout
    return where / "demo.zarr"


def test_simulate_writes_valid_ngff_with_ground_truth(demo_store):
    root = check_store(demo_store, "tyx", (5, 256, 256))
    assert root["0"].dtype == np.uint16
    assert root["labels"][GT]["0"].dtype == np.uint32
    assert len(root.attrs["multiscales"][0]["datasets"]) == 3  # 256, 128, 64


def test_ground_truth_lies_on_nuclei(demo_store):
    image, truth = arrays(demo_store)
    for t in range(image.shape[0]):
        frame, labels = image[t].astype(np.float64), truth[t]
        assert labels.any()
        far = ~ndimage.binary_dilation(labels > 0, iterations=4)
        background = frame[far]
        # Every ground-truth pixel is brighter than nearly all of the background ...
        assert frame[labels > 0].min() > np.percentile(background, 99)
        # ... and every nucleus on average brighter than all of it.
        ids = np.unique(labels[labels > 0])
        means = np.asarray(ndimage.mean(frame, labels, ids))
        assert means.min() > background.max()


def test_ids_persist_except_at_divisions(demo_store):
    _, truth = arrays(demo_store)
    divisions = ome_io.run_status(demo_store)["divisions"]
    assert divisions, "expected at least one division in 5 frames at the default rate"
    seen = set()
    previous = None
    for t in range(truth.shape[0]):
        ids = set(np.unique(truth[t]).tolist()) - {0}
        if previous is not None:
            here = [d for d in divisions if d[0] == t]
            mothers = {m for _, m, _ in here}
            daughters = {d for _, _, d in here}
            assert mothers <= previous and not mothers & ids
            assert not daughters & seen  # daughters get new IDs
            assert ids == (previous - mothers) | daughters
            for mother in mothers:
                assert sum(1 for _, m, _ in here if m == mother) == 2
        else:
            assert not [d for d in divisions if d[0] == 0]
        seen |= ids
        previous = ids
    assert all(0 < d[0] < truth.shape[0] for d in divisions)


def test_simulate_is_deterministic(tmp_path, cli_runner):
    args = ("--frames", "3", "--shape", "128,96", "--diameter", "16")
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        path = tmp_path / f"{name}.zarr"
        result = invoke(cli_runner, "simulate", path, *args, "--seed", seed)
        assert result.exit_code == 0, result.output
        runs[name] = arrays(path)
    for same, other in zip(runs["a"], runs["b"], strict=True):
        np.testing.assert_array_equal(same, other)
    assert not np.array_equal(runs["a"][0], runs["c"][0])
    assert not np.array_equal(runs["a"][1], runs["c"][1])
    check_store(tmp_path / "a.zarr", "tyx", (3, 128, 96))


def test_granules_change_the_image_not_the_labels(tmp_path, cli_runner):
    args = ("--frames", "2", "--shape", "64,64", "--diameter", "12", "--seed", "5")
    invoke(cli_runner, "simulate", tmp_path / "plain.zarr", *args)
    result = invoke(cli_runner, "simulate", tmp_path / "granules.zarr", *args, "--granules")
    assert result.exit_code == 0, result.output
    plain, granular = arrays(tmp_path / "plain.zarr"), arrays(tmp_path / "granules.zarr")
    np.testing.assert_array_equal(plain[1], granular[1])
    assert not np.array_equal(plain[0], granular[0])


def test_simulate_3d(tmp_path, cli_runner):
    path = tmp_path / "nuclei3d.zarr"
    result = invoke(
        cli_runner, "simulate", path, "--frames", "2", "--shape", "128,128", "--depth", "10",
        "--diameter", "8", "--seed", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    check_store(path, "tzyx", (2, 10, 128, 128))
    image, truth = arrays(path)
    assert truth.max() > 0
    # Nuclei are brighter than the background in 3D, too.
    assert image[truth > 0].mean() > image[truth == 0].mean() + 100
    opened = ome_io.open_image(path)
    assert opened.spatial_dims == 3 and opened.spatial_axes == "zyx"


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--frames", "0"], ["frames"]),
        (["--frames", "-2"], ["frames"]),
        (["--shape", "-5,64"], ["shape"]),
        (["--shape", "0,64"], ["shape"]),
        (["--shape", "64,64", "--depth", "0"], ["shape"]),
        (["--shape", "64,64", "--depth", "-3"], ["shape"]),
        (["--shape", "64,64", "--diameter", "100"], ["diameter", "larger"]),
        (["--shape", "64,64", "--depth", "6", "--diameter", "12"], ["diameter", "larger"]),
        (["--shape", "64,64", "--diameter", "0"], ["diameter"]),
        (["--shape", "abc"], ["shape"]),
        (["--shape", "64"], ["shape"]),
    ],
)
def test_nonsense_sizes_refused(tmp_path, cli_runner, args, words):
    out = tmp_path / "out.zarr"
    result = invoke(cli_runner, "simulate", out, *args)
    assert_user_error(result.exit_code, result.stderr, result.output, *words)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--frames", "0"], ["frames"]),
        (["--shape", "-5,256"], ["shape"]),
        (["--shape", "64,64", "--diameter", "100"], ["diameter"]),
    ],
)
def test_nonsense_sizes_refused_end_to_end(tmp_path, run_cli, args, words):
    result = run_cli("simulate", "out.zarr", *args, cwd=tmp_path)
    assert_user_error(result.returncode, result.stderr, result.stdout, *words)
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_then_overwritten(tmp_path, run_cli, cli_runner, digest):
    args = ("--frames", "2", "--shape", "64,64", "--diameter", "12")
    path = tmp_path / "sim.zarr"
    assert invoke(cli_runner, "simulate", path, *args, "--seed", "1").exit_code == 0
    before = digest(path)
    first = arrays(path)

    refused = run_cli("simulate", path, *args, "--seed", "2")
    assert_user_error(refused.returncode, refused.stderr, refused.stdout, "exists", "--overwrite")
    assert digest(path) == before

    in_process = invoke(cli_runner, "simulate", path, *args, "--seed", "2")
    assert_user_error(in_process.exit_code, in_process.stderr, in_process.output, "exists")
    assert digest(path) == before

    replaced = invoke(cli_runner, "simulate", path, *args, "--seed", "2", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    second = arrays(path)
    assert not np.array_equal(first[0], second[0])
    invoke(cli_runner, "simulate", tmp_path / "fresh.zarr", *args, "--seed", "2")
    for a, b in zip(second, arrays(tmp_path / "fresh.zarr"), strict=True):
        np.testing.assert_array_equal(a, b)
    check_store(path, "tyx", (2, 64, 64))


def test_output_folder_missing(tmp_path, cli_runner):
    out = tmp_path / "no" / "such" / "out.zarr"
    result = invoke(cli_runner, "simulate", out, "--frames", "1", "--shape", "64,64")
    assert_user_error(result.exit_code, result.stderr, result.output, "does not exist")
    assert not (tmp_path / "no").exists()
