"""``cellulus-scale export``: the labels as one TIFF per frame and a CSV of per-object
measurements, through the command line, for 2D, multichannel and 3D outputs; bad input."""

from __future__ import annotations

import csv
import shutil
import subprocess

import numpy as np
import pytest
import tifffile
import zarr
from conftest import assert_one_line_error
from skimage.measure import regionprops

from cellulus_scale.io import ome_zarr as ome_io


def _read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("axes", ["tcyx", "tzyx", "czyx"])
def test_export_masks_and_measurements(tmp_path, predicted_layout, run_cli, axes):
    store = predicted_layout(axes)
    folder = tmp_path / "export"
    result = run_cli("export", store, folder)
    assert result.returncode == 0, result.stderr
    labels = ome_io.open_labels(store, "cellulus").canonical()[:, 0].compute()  # (t, z, y, x)
    image = ome_io.open_image(store).canonical().compute()  # (t, c, z, y, x)
    frames = labels.shape[0]
    assert sorted(p.name for p in folder.iterdir()) == [
        *[f"mask{t:03d}.tif" for t in range(frames)],
        "measurements.csv",
    ]
    rows = _read_csv(folder / "measurements.csv")
    three_d = labels.shape[1] > 1
    spatial = "zyx" if three_d else "yx"
    columns = ["frame", "label", *[f"centroid_{a}" for a in spatial], "area"]
    if "c" in axes:  # a column per channel, named after the omero channels
        columns += ["mean_intensity_nuclei", "mean_intensity_membrane"]
    else:
        columns += ["mean_intensity"]
    assert list(rows[0]) == columns
    for t in range(frames):
        mask = tifffile.imread(folder / f"mask{t:03d}.tif")
        expected = labels[t] if three_d else labels[t, 0]
        assert mask.dtype == np.uint16 and mask.shape == expected.shape
        np.testing.assert_array_equal(mask, expected)
        pixels = image[t] if three_d else image[t, :, 0]
        objects = regionprops(expected.astype(np.int64))
        here = [r for r in rows if int(r["frame"]) == t]
        assert [int(r["label"]) for r in here] == [o.label for o in objects]
        for row, found in zip(here, objects, strict=True):
            assert int(row["area"]) == found.area
            centroid = [float(row[f"centroid_{a}"]) for a in spatial]
            assert centroid == pytest.approx(found.centroid, abs=1e-3)
            channel = -1 if "c" in axes else 0  # the last channel's mean
            inside = pixels[channel][expected == found.label]
            assert float(row[columns[-1]]) == pytest.approx(inside.mean(), abs=1e-3)
    assert "rows" in result.stdout and str(len(rows)) in result.stdout


def test_export_refuses_bad_input(tmp_path, predicted_layout, run_cli, cli_runner):
    from cellulus_scale.cli.main import main

    store = predicted_layout("tyx")
    folder = tmp_path / "export"
    assert run_cli("export", store, folder, "--no-measurements").returncode == 0
    assert [p.name for p in sorted(folder.iterdir())][:1] == ["mask000.tif"]

    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(store, incomplete)
    ome_io.mark_status(zarr.open_group(str(incomplete), mode="r+"), "incomplete")
    cases = [
        ([store, folder], ["already holds an export", "--overwrite"]),
        ([incomplete, tmp_path / "other"], ["incomplete", "--resume"]),
        ([store, tmp_path / "other", "--labels", "nope"], ["no label image named 'nope'"]),
        ([store, tmp_path / "missing" / "folder"], ["does not exist"]),
        ([store, tmp_path / "other", "--no-masks", "--no-measurements"], ["nothing to export"]),
        ([tmp_path / "none.zarr", tmp_path / "other"], ["no such file"]),
    ]
    for args, words in cases:
        ran = cli_runner.invoke(main, ["export", *map(str, args)])
        assert ran.exception is None or isinstance(ran.exception, SystemExit), ran.output
        refused = subprocess.CompletedProcess(args, ran.exit_code, ran.output, ran.stderr)
        assert_one_line_error(refused, *words)
    assert not (tmp_path / "other").exists()
    # --overwrite replaces the export
    result = run_cli("export", store, folder, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (folder / "measurements.csv").exists()
