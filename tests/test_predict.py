"""Blockwise prediction end to end: equality with whole-frame prediction, stitching, clusters."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import image_digest
from distributed import Client

from cellulus_scale.evaluation.metrics import match_pairs, overlap_table
from cellulus_scale.io.ome_zarr import open_labels
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import train
from cellulus_scale.workflows.predict import predict

SHAPE = (200, 232)  # 96 and 128 do not divide it


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("predict")


@pytest.fixture(scope="module")
def video(workdir: Path) -> Path:
    return write_simulation(workdir / "video.zarr", SimulationSpec(frames=2, shape=SHAPE, seed=3))


@pytest.fixture(scope="module")
def model(workdir: Path, video: Path) -> Path:
    path = workdir / "model.pt"
    train(video, path, preset="cpu", epochs=1, min_crops_per_epoch=480, progress=False, seed=0)
    return path


def run(video: Path, model: Path, out: Path, client: Client, **options) -> Path:
    settings = {"diameter": 24, "tta": 4, "overwrite": True, "progress": False}
    settings.update(options)
    predict(video, out, model, client=client, **settings)
    return out


def labels_of(path: Path) -> np.ndarray:
    return open_labels(path, "cellulus").data.compute()


def f1_at(truth: np.ndarray, pred: np.ndarray, threshold: float) -> float:
    table = overlap_table(truth, pred)
    matched = len(match_pairs(table, threshold)[0])
    total = table.n_true + table.n_pred
    return 1.0 if total == 0 else 2 * matched / total


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_blockwise_embeddings_equal_whole_frame(video, model, workdir, client):
    whole = run(
        video, model, workdir / "e_whole.zarr", client, block_size=256, save_embeddings=True
    )
    reference = zarr.open_array(str(whole / "embeddings" / "0"), mode="r")[:]
    assert reference.shape == (2, 3, *SHAPE)
    for size in (64, 96):
        out = run(
            video, model, workdir / f"e_{size}.zarr", client, block_size=size, save_embeddings=True
        )
        blockwise = zarr.open_array(str(out / "embeddings" / "0"), mode="r")[:]
        assert np.abs(blockwise - reference).max() < 1e-4


def test_saved_embeddings_change_no_label_and_the_compact_scratch_is_removed(
    video, model, workdir, client
):
    saved = workdir / "e_whole.zarr"
    if not saved.exists():
        run(video, model, saved, client, block_size=256, save_embeddings=True)
    plain = run(video, model, workdir / "plain_256.zarr", client, block_size=256)
    # the labels come from the compact OCEs either way; the float32 ones are only kept
    assert np.array_equal(labels_of(plain), labels_of(saved))
    assert not (plain / "embeddings").exists() and not (plain / ".cellulus-scale").exists()
    assert (saved / "embeddings" / "0").exists()


def test_into_input_writes_only_the_inputs_labels_group(video, model, workdir, client):
    from ome_zarr_models.v04 import Image, ImageLabel, Labels

    reference = workdir / "local.zarr"
    if not reference.exists():
        run(video, model, reference, client, block_size=128)
    target = workdir / "into.zarr"
    shutil.copytree(video, target)
    before = image_digest(target)
    predict(
        target,
        None,
        model,
        diameter=24,
        tta=4,
        block_size=128,
        client=client,
        progress=False,
        into_input=True,
    )
    assert image_digest(target) == before  # the image and its metadata, byte for byte
    assert np.array_equal(labels_of(target), labels_of(reference))
    root = zarr.open_group(str(target), mode="r")
    Image.from_zarr(root)
    assert set(Labels.from_zarr(root["labels"]).attributes.labels) == {"ground_truth", "cellulus"}
    ImageLabel.from_zarr(root["labels"]["cellulus"])
    assert not (target / "labels" / ".cellulus-scale").exists()
    expect_refusal(
        cli("predict", target, "--into-input", "--model", model, "--diameter", "24"),
        "labels/cellulus",
        "--overwrite",
    )
    expect_refusal(cli("predict", target, "--model", model, "--diameter", "24"), "--into-input")
    assert image_digest(target) == before


def test_an_interrupted_run_into_the_input_resumes_to_the_same_labels(
    video, model, workdir, client, monkeypatch
):
    import cellulus_scale.methods.centres as centres

    reference = workdir / "local.zarr"
    if not reference.exists():
        run(video, model, reference, client, block_size=128)
    target = workdir / "into_resumed.zarr"
    shutil.copytree(video, target)
    before = image_digest(target)
    options = dict(diameter=24, tta=4, block_size=128, client=client, progress=False)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # after the OCE stage, as Ctrl-C would

    with monkeypatch.context() as patch:
        patch.setattr(centres, "number_centres", stop)
        with pytest.raises(KeyboardInterrupt):
            predict(target, None, model, into_input=True, **options)
    assert (target / "labels" / ".cellulus-scale" / "oce").exists()
    assert "cellulus" not in zarr.open_group(str(target / "labels"), mode="r").attrs["labels"]
    result = predict(target, None, model, into_input=True, resume=True, **options)
    assert result.recomputed["oce"] == 0
    assert np.array_equal(labels_of(target), labels_of(reference))
    assert image_digest(target) == before


def test_labels_do_not_depend_on_block_size(video, model, workdir, client):
    results = {
        size: labels_of(run(video, model, workdir / f"l_{size}.zarr", client, block_size=size))
        for size in (96, 128, 256)
    }
    whole = results[256]
    assert len(np.unique(whole)) > 20
    for size in (96, 128):
        for frame in range(whole.shape[0]):
            assert f1_at(whole[frame], results[size][frame], 0.9) >= 0.99


def test_border_nuclei_get_one_id_and_ids_are_unique_across_frames(video, model, workdir, client):
    labels = labels_of(run(video, model, workdir / "border.zarr", client, block_size=96))
    truth = open_labels(video, "ground_truth").data.compute()
    crossing = 0
    for frame in range(labels.shape[0]):
        for nucleus in np.unique(truth[frame][:, 90:102]):
            if nucleus == 0:
                continue
            mask = truth[frame] == nucleus
            left = labels[frame][:, :96][mask[:, :96]]
            right = labels[frame][:, 96:][mask[:, 96:]]
            left, right = left[left > 0], right[right > 0]
            if len(left) < 20 or len(right) < 20:
                continue
            crossing += 1
            assert np.bincount(left).argmax() == np.bincount(right).argmax()
    assert crossing >= 3
    ids = [set(np.unique(frame)) - {0} for frame in labels]
    assert ids[0] and ids[1] and not ids[0] & ids[1]


def test_local_cluster_and_dask_processes_give_identical_labels(video, model, workdir, client):
    local = labels_of(run(video, model, workdir / "local.zarr", client, block_size=128))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    scheduler = subprocess.Popen(
        [
            bindir / "dask",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-dashboard",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers = [
        subprocess.Popen(
            [
                bindir / "dask",
                "worker",
                address,
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        with Client(address, timeout=30) as remote:
            remote.wait_for_workers(2, timeout=60)
            out = workdir / "remote.zarr"
            result = subprocess.run(
                [
                    bindir / "cellulus-scale",
                    "predict",
                    video,
                    out,
                    "--model",
                    model,
                    "--diameter",
                    "24",
                    "--tta",
                    "4",
                    "--block-size",
                    "128",
                    "--scheduler",
                    address,
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, result.stderr
        assert np.array_equal(labels_of(out), local)
    finally:
        for process in [*workers, scheduler]:
            process.kill()
            process.wait(timeout=30)


def test_watershed_baseline_runs_through_the_same_machinery(video, workdir, client):
    out = workdir / "watershed.zarr"
    predict(
        video,
        out,
        None,
        diameter=24,
        method="watershed",
        block_size=96,
        client=client,
        progress=False,
    )
    labels = labels_of(out)
    truth = open_labels(video, "ground_truth").data.compute()
    assert f1_at(truth[0], labels[0], 0.5) > 0.7


def cli(*args: object) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "cellulus-scale"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120)


def expect_refusal(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


def test_bad_input_is_refused_with_one_line_and_the_input_untouched(video, model, workdir):
    before = tree_hash(video)
    out = workdir / "refused.zarr"
    for diameter in ("0", "-3", "nan"):
        expect_refusal(
            cli("predict", video, out, "--model", model, "--diameter", diameter), "diameter"
        )
    expect_refusal(
        cli("predict", video, out, "--model", model, "--diameter", "500"), "larger than the frame"
    )
    expect_refusal(
        cli("predict", video, out, "--model", model, "--diameter", "24", "--block-size", "8"),
        "block size",
    )
    started = time.perf_counter()
    expect_refusal(
        cli(
            "predict",
            video,
            out,
            "--model",
            model,
            "--diameter",
            "24",
            "--scheduler",
            "tcp://127.0.0.1:9",
        ),
        "tcp://127.0.0.1:9",
    )
    assert time.perf_counter() - started < 60
    other = workdir / "model3d.pt"
    from cellulus_scale.config import ModelConfig
    from cellulus_scale.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from cellulus_scale.model.unet import UNet

    checkpoint = load_checkpoint(model)
    config = ModelConfig(spatial_dims=3, feature_maps=4)
    save_checkpoint(
        Checkpoint("oce", config, checkpoint.normalisation, UNet(config).state_dict(), "tzyx"),
        other,
    )
    expect_refusal(cli("predict", video, out, "--model", other, "--diameter", "24"), "3D")
    assert not out.exists()
    existing = workdir / "existing.zarr"
    existing.mkdir()
    expect_refusal(
        cli("predict", video, existing, "--model", model, "--diameter", "24"), "--overwrite"
    )
    shutil.rmtree(existing)
    assert tree_hash(video) == before


@pytest.mark.parametrize("z_scale", [1.0, 2.5])
def test_3d_blockwise_embeddings_equal_whole_volume(workdir, client, z_scale):
    """Blocks of 16 (splitting z) and the whole volume give the same embeddings, isotropic and
    with anisotropic voxels (the model's first level flat, its z context 2 planes, embeddings
    physical); the output keeps the input's scale. (The labels of an untrained model are not
    compared: its embeddings scatter objects beyond the clustering halo.)"""
    from cellulus_scale.config import ModelConfig
    from cellulus_scale.kernels.normalisation import Normalisation
    from cellulus_scale.model.checkpoint import Checkpoint, save_checkpoint
    from cellulus_scale.model.unet import UNet

    spec = SimulationSpec(frames=1, shape=(20, 40, 40), diameter=8, seed=2, z_scale=z_scale)
    volume = write_simulation(workdir / f"volume_{z_scale}.zarr", spec)
    spacing = None if z_scale == 1.0 else (z_scale, 1.0, 1.0)
    config = ModelConfig(spatial_dims=3, feature_maps=4, spacing=spacing)
    assert config.flat_levels == (0 if spacing is None else 1)
    model = workdir / f"model3d_untrained_{z_scale}.pt"
    torch_seed(4)
    save_checkpoint(
        Checkpoint("oce", config, Normalisation(100.0, 1000.0), UNet(config).state_dict(), "tzyx"),
        model,
    )
    embeddings = {}
    for size in (16, 40):
        out = run(
            volume,
            model,
            workdir / f"v_{z_scale}_{size}.zarr",
            client,
            diameter=8,
            block_size=size,
            save_embeddings=True,
        )
        embeddings[size] = zarr.open_array(str(out / "embeddings" / "0"), mode="r")[:]
        assert labels_of(out).shape == (1, 20, 40, 40)
        scale = zarr.open_group(str(out), mode="r").attrs["multiscales"][0]["datasets"][0]
        assert scale["coordinateTransformations"][0]["scale"] == [1.0, z_scale, 1.0, 1.0]
    assert embeddings[40].shape == (1, 4, 20, 40, 40)
    assert np.abs(embeddings[16] - embeddings[40]).max() < 1e-4


def ideal_offsets(truth: np.ndarray, spacing: np.ndarray, halos: tuple[int, ...]):
    """A stand-in for the network: every voxel of a nucleus points exactly at its centre
    (physical offsets, std 0); background voxels have std 10. Same signature as
    :func:`~cellulus_scale.kernels.oce.predict_oce_block`."""
    ids = np.arange(truth.max() + 1)
    grid = np.indices(truth.shape).reshape(truth.ndim, -1).T * spacing
    counts = np.bincount(truth.ravel(), minlength=len(ids))
    sums = np.stack([np.bincount(truth.ravel(), grid[:, a], len(ids)) for a in range(3)], 1)
    centres = sums / np.maximum(counts, 1)[:, None]

    def network(model, image, grids, frame, *args, **kwargs):
        index = [np.asarray(g).ravel() for g in grids]
        index = [i[h : len(i) - h] for i, h in zip(index, halos, strict=True)]
        region = truth[np.ix_(*index)]
        positions = np.stack(np.meshgrid(*index, indexing="ij")) * spacing[:, None, None, None]
        offsets = np.moveaxis(centres[region], -1, 0) - positions
        offsets[:, region == 0] = 0.0
        std = np.where(region > 0, 0.0, 10.0)
        return offsets.astype(np.float32), std.astype(np.float32)

    return network


def test_3d_anisotropic_labels_do_not_depend_on_blocks_splitting_z(workdir, monkeypatch):
    """With ideal embeddings (a stand-in network), blocks of 16 (splitting z into 2 and y, x
    into 3), blocks of 4 planes by 16 x 16 px, and the whole volume give the same labels on
    planes 3 px apart, where the clustering and labelling halos are a diameter in physical
    distance: 4 planes in z for d = 10, not 10. The network's own block independence is
    tested above."""
    from distributed import LocalCluster

    from cellulus_scale.config import ModelConfig
    from cellulus_scale.kernels.normalisation import Normalisation
    from cellulus_scale.methods import oce
    from cellulus_scale.model.checkpoint import Checkpoint, save_checkpoint
    from cellulus_scale.model.unet import UNet, contexts

    spec = SimulationSpec(frames=1, shape=(20, 48, 48), diameter=10, seed=5, z_scale=3.0)
    volume = write_simulation(workdir / "ideal.zarr", spec)
    truth = open_labels(volume, "ground_truth").data.compute()[0]
    config = ModelConfig(spatial_dims=3, feature_maps=4, spacing=(3.0, 1.0, 1.0))
    model = workdir / "ideal.pt"
    save_checkpoint(
        Checkpoint("oce", config, Normalisation(100.0, 1000.0), UNet(config).state_dict(), "tzyx"),
        model,
    )
    network = ideal_offsets(truth.astype(np.int64), np.array([3.0, 1.0, 1.0]), contexts(config))
    monkeypatch.setattr(oce, "predict_oce_block", network)
    labels = {}
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    )
    with Client(cluster) as client:  # workers in this process: they see the stand-in
        for size in (16, 48, (4, 16, 16)):
            name = "_".join(map(str, np.atleast_1d(size)))
            out = run(volume, model, workdir / f"ideal_{name}.zarr", client, diameter=10,
                      block_size=size, tta=2)  # fmt: skip
            labels[size] = labels_of(out)[0]
    cluster.close()
    assert len(np.unique(labels[48])) > 15
    assert f1_at(truth, labels[48], 0.5) > 0.8  # the stand-in is near the truth
    assert np.array_equal(labels[16], labels[48])
    # blocks per axis: 4 planes (the smallest a diameter of 4 planes allows) by 16 x 16 px
    assert np.array_equal(labels[(4, 16, 16)], labels[48])


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def test_objects_too_small_for_the_model_are_warned_of_in_one_line(
    video, model, workdir, client, capfd
):
    run(video, model, workdir / "small.zarr", client, diameter=6, tta=2)
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert "6.0 px" in warnings[0] and "2x larger" in warnings[0]
    run(video, model, workdir / "usual.zarr", client, tta=2)
    assert "warning" not in capfd.readouterr().err
