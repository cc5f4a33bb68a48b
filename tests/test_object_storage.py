"""Input, output and model in object storage: an S3 server on loopback (moto), reached through
zarr's fsspec stores with the credentials and endpoint of the usual environment variables.
Labels identical to a local run, resume after an interruption, the CLI with URLs, reading over
plain HTTP, and one-line refusals of what an output in object storage cannot hold."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from distributed import Client, LocalCluster

from cellulus_scale.io.ome_zarr import open_labels, run_status
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import train
from cellulus_scale.workflows.predict import predict

BUCKET = "cellulus"
OPTIONS = {"diameter": 24, "tta": 2, "block_size": 128, "progress": False}


@pytest.fixture(scope="module")
def s3():
    """An S3 server on loopback, named in the environment as AWS clients expect; its bucket
    readable anonymously over HTTP as well; the s3fs file system."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(s3_additional_kwargs={"ACL": "public-read"})
    fs.mkdir(BUCKET, acl="public-read")
    try:
        yield fs, f"http://{host}:{port}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A simulated video, a model trained on it and the local prediction."""
    folder = tmp_path_factory.mktemp("object_storage")
    video = write_simulation(folder / "video.zarr", SimulationSpec(frames=2, shape=(200, 232)))
    model = folder / "model.pt"
    train(video, model, preset="cpu", epochs=1, min_crops_per_epoch=160, progress=False, seed=0)
    output = predict(video, folder / "local.zarr", model, workers=2, **OPTIONS).output
    return {"video": video, "model": model, "output": output, "folder": folder}


@pytest.fixture(scope="module")
def uploaded(s3, local) -> dict[str, str]:
    """The video and the model in the bucket."""
    fs, _ = s3
    fs.put(str(local["video"]), f"{BUCKET}/video.zarr", recursive=True)
    fs.put_file(str(local["model"]), f"{BUCKET}/model.pt")
    return {"video": f"s3://{BUCKET}/video.zarr", "model": f"s3://{BUCKET}/model.pt"}


@pytest.fixture(scope="module")
def client(s3) -> Client:
    """Workers started after the server, so that they see its environment."""
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    )
    with Client(cluster) as dask:
        yield dask
    cluster.close()


def listing(fs, prefix: str) -> dict[str, str]:
    return {path: info["ETag"] for path, info in fs.find(prefix, detail=True).items()}


def test_predict_from_and_into_s3_equals_local_and_resumes(
    s3, local, uploaded, client, monkeypatch
):
    import cellulus_scale.methods.centres as centres

    fs, _ = s3
    before = listing(fs, f"{BUCKET}/video.zarr")
    output = f"s3://{BUCKET}/out.zarr"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # after the OCE stage, as Ctrl-C would

    with monkeypatch.context() as patch:
        patch.setattr(centres, "number_centres", stop)
        with pytest.raises(KeyboardInterrupt):
            predict(uploaded["video"], output, uploaded["model"], client=client, **OPTIONS)
    assert run_status(output)["status"] == "incomplete"
    assert fs.exists(f"{BUCKET}/out.zarr/.cellulus-scale/oce")
    result = predict(
        uploaded["video"], output, uploaded["model"], client=client, resume=True, **OPTIONS
    )
    assert result.recomputed["oce"] == 0 and result.recomputed["labels"] > 0
    assert str(result.output) == output
    labels = open_labels(output, "cellulus").data.compute()
    assert labels.max() > 10
    assert np.array_equal(labels, open_labels(local["output"], "cellulus").data.compute())
    assert run_status(output)["status"] == "complete"
    assert not fs.exists(f"{BUCKET}/out.zarr/.cellulus-scale")
    assert listing(fs, f"{BUCKET}/video.zarr") == before  # the input is never written to


def test_cli_with_urls_and_reading_over_http(s3, local, uploaded, run_cli):
    fs, http = s3
    output = f"s3://{BUCKET}/cli.zarr"
    done = run_cli(
        "predict", uploaded["video"], output, "--model", uploaded["model"], "--diameter", "24",
        "--tta", "2", "--block-size", "128", "--workers", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert output in done.stdout
    scored = run_cli("evaluate", output, "--truth", uploaded["video"])
    assert scored.returncode == 0, scored.stderr
    overall = next(line for line in scored.stdout.splitlines() if line.split()[:1] == ["all"])
    assert float(overall.split()[-3]) > 0.8  # F1 against the simulator's truth
    # plain HTTP (anonymous) reading of the same input, into a local output
    target = local["folder"] / "from_http.zarr"
    read = run_cli(
        "predict", f"{http}/{BUCKET}/video.zarr", target, "--model", local["model"],
        "--diameter", "24", "--tta", "2", "--block-size", "128", "--workers", "2",
    )  # fmt: skip
    assert read.returncode == 0, read.stderr
    expected = open_labels(local["output"], "cellulus").data.compute()
    assert np.array_equal(open_labels(target, "cellulus").data.compute(), expected)


def test_what_object_storage_cannot_hold_is_refused_in_one_line(s3, uploaded, run_cli):
    _, http = s3
    read_only = run_cli(
        "predict", uploaded["video"], f"{http}/{BUCKET}/x.zarr", "--model", uploaded["model"],
        "--diameter", "24",
    )  # fmt: skip
    assert_one_line_error(read_only, "can only be read", "s3://")
    untrained = run_cli("predict", uploaded["video"], f"s3://{BUCKET}/x.zarr", "--diameter", "24")
    assert_one_line_error(untrained, "object storage", "--model")
    linked = run_cli(
        "predict", uploaded["video"], f"s3://{BUCKET}/x.zarr", "--model", uploaded["model"],
        "--diameter", "24", "--link",
    )  # fmt: skip
    assert_one_line_error(linked, "--link", "local")
    for command in ("refine", "link"):
        local_only = run_cli(command, f"s3://{BUCKET}/out.zarr")
        assert_one_line_error(local_only, command, "local stores", "copy")
    missing = run_cli("evaluate", f"s3://{BUCKET}/missing.zarr")
    assert_one_line_error(missing, "s3://", "not a readable zarr store", "AWS_ENDPOINT_URL")
