"""NGFF 0.5 output (zarr v3, one shard per block and frame): the same labels as NGFF 0.4,
validated by ome-zarr-models, found by ome-zarr-py's reader, one file per block and frame, and
the labels written into an NGFF 0.5 input in its own version, resumably."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import image_digest
from distributed import Client

from cellulus_scale.io.ome_zarr import inner_chunks, open_labels
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import train
from cellulus_scale.workflows.predict import predict

SHAPE = (200, 232)
BLOCK = 128  # blocks of 128 x 128: a 2 x 2 grid of shards per frame
FRAMES = 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ngff05")


@pytest.fixture(scope="module")
def video(workdir: Path) -> Path:
    spec = SimulationSpec(frames=FRAMES, shape=SHAPE, seed=3)
    return write_simulation(workdir / "video.zarr", spec)


@pytest.fixture(scope="module")
def model(workdir: Path, video: Path) -> Path:
    path = workdir / "model.pt"
    train(video, path, preset="cpu", epochs=1, min_crops_per_epoch=160, progress=False, seed=0)
    return path


def run(video: Path, out: Path | None, model: Path, client: Client, **options) -> Path:
    settings = {"diameter": 24, "tta": 2, "block_size": BLOCK, "progress": False}
    settings.update(options)
    return predict(video, out, model, client=client, **settings).output


def labels_of(path: Path, name: str = "cellulus") -> np.ndarray:
    return open_labels(path, name).data.compute()


def level0_files(array: Path) -> list[Path]:
    return [p for p in (array / "c").rglob("*") if p.is_file()]


def test_inner_chunks_divide_the_shard_and_stay_viewer_sized():
    assert inner_chunks((1, 256, 256)) == (1, 128, 128)
    assert inner_chunks((1, 3, 200, 232)) == (1, 3, 100, 116)
    assert inner_chunks((1, 64, 64)) == (1, 64, 64)
    assert inner_chunks((1, 131)) == (1, 131)  # a prime side: one inner chunk


def test_ngff05_output_has_the_04_labels_validates_and_writes_one_shard_per_block(
    video, model, workdir, client
):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader
    from ome_zarr_models.v05 import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    old = run(video, workdir / "out04.zarr", model, client)
    new = run(video, workdir / "out05.zarr", model, client, ngff_version="0.5", link=True)
    assert np.array_equal(labels_of(new), labels_of(old))
    assert labels_of(new).max() > 10
    root = zarr.open_group(str(new), mode="r")
    assert root.metadata.zarr_format == 3
    image = Image.from_zarr(root)
    assert set(image.labels.attributes.ome.labels) == {"cellulus", "tracks"}
    for name in ("cellulus", "tracks"):
        label = ImageLabel.from_zarr(root["labels"][name])
        assert label.attributes.ome.multiscales[0].axes[0].name == "t"
    nodes = list(Reader(parse_url(str(new)))())
    found = {type(spec) for node in nodes for spec in node.specs}
    assert {Multiscales, Label} <= found
    # one shard file per block and frame; the inner chunks are what viewers read
    blocks = -(-SHAPE[0] // BLOCK) * -(-SHAPE[1] // BLOCK)
    for array in (new / "0", new / "labels" / "cellulus" / "0"):
        meta = zarr.open_array(str(array), mode="r")
        assert meta.shards == (1, BLOCK, BLOCK)
        assert meta.metadata.dimension_names == ("t", "y", "x")
        assert len(level0_files(array)) == FRAMES * blocks
    # the image copy is the input, and the scratch is gone
    assert np.array_equal(
        zarr.open_array(str(new / "0"), mode="r")[:], zarr.open_array(str(video / "0"))[:]
    )
    assert not (new / ".cellulus-scale").exists()


def test_ngff05_through_the_cli_with_evaluate_and_refusals(video, model, workdir, run_cli):
    from conftest import assert_one_line_error

    out = workdir / "cli05.zarr"
    done = run_cli(
        "predict", video, out, "--model", model, "--diameter", "24", "--tta", "2",
        "--block-size", str(BLOCK), "--ngff", "0.5", "--workers", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "zarr.json").exists() and not (out / ".zattrs").exists()
    scored = run_cli("evaluate", out, "--truth", video)
    assert scored.returncode == 0, scored.stderr
    overall = next(line for line in scored.stdout.splitlines() if line.split()[:1] == ["all"])
    assert float(overall.split()[-3]) > 0.8  # F1 against the simulator's truth
    refused = run_cli("predict", video, "--into-input", "--ngff", "0.5", "--model", model)
    assert_one_line_error(refused, "--ngff 0.5", "0.4", "drop --ngff")
    bad = run_cli("predict", video, workdir / "x.zarr", "--ngff", "0.6")
    assert bad.returncode == 2 and "0.6" in bad.stderr


def test_labels_into_an_ngff05_input_keep_its_version_and_resume(
    model, workdir, client, monkeypatch
):
    from ome_zarr_models.v05 import Image

    import cellulus_scale.methods.centres as centres

    source = write_simulation(
        workdir / "video05.zarr",
        SimulationSpec(frames=FRAMES, shape=SHAPE, seed=3),
        ngff_version="0.5",
    )
    reference = run(source, workdir / "from05.zarr", model, client)  # a new output: 0.4
    assert zarr.open_group(str(reference), mode="r").metadata.zarr_format == 2
    target = workdir / "into05.zarr"
    shutil.copytree(source, target)
    before = image_digest(target)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # after the OCE stage, as Ctrl-C would

    with monkeypatch.context() as patch:
        patch.setattr(centres, "number_centres", stop)
        with pytest.raises(KeyboardInterrupt):
            run(target, None, model, client, into_input=True)
    result = predict(
        target, None, model, diameter=24, tta=2, block_size=BLOCK, client=client,
        progress=False, into_input=True, resume=True,
    )  # fmt: skip
    assert result.recomputed["oce"] == 0
    assert np.array_equal(labels_of(target), labels_of(reference))
    assert image_digest(target) == before
    root = zarr.open_group(str(target), mode="r")
    assert root["labels/cellulus/0"].metadata.zarr_format == 3
    assert set(Image.from_zarr(root).labels.attributes.ome.labels) == {"ground_truth", "cellulus"}


def test_simulate_writes_ngff05(workdir, run_cli):
    from ome_zarr_models.v05 import Image

    out = workdir / "sim05.zarr"
    done = run_cli("simulate", out, "--frames", "1", "--shape", "96,96", "--ngff", "0.5")
    assert done.returncode == 0, done.stderr
    Image.from_zarr(zarr.open_group(str(out), mode="r"))
