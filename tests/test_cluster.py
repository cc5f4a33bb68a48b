"""Where tasks run: network tasks on GPU-resource workers only, and a loopback-only local
cluster.

There is no GPU here: the "GPU" worker is an ordinary CPU worker advertising the Dask resource
``GPU=1``, so these tests check the scheduling, not CUDA.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psutil
import pytest
import torch
import zarr
from distributed import Client, LocalCluster, get_task_stream

from cellulus_scale.blockwise.cluster import GPU_WORKERS_PER_GPU, dask_client, network_resources
from cellulus_scale.config import ModelConfig
from cellulus_scale.io.ome_zarr import open_labels
from cellulus_scale.kernels.normalisation import Normalisation
from cellulus_scale.model.checkpoint import Checkpoint, save_checkpoint
from cellulus_scale.model.unet import UNet
from cellulus_scale.workflows.predict import predict

BIN = Path(sys.executable).parent
SETTINGS = {"diameter": 16, "tta": 2, "block_size": 64, "progress": False}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, simulated_store: Path) -> Path:
    """An untrained checkpoint: the labels only have to be the same on both clusters."""
    torch.manual_seed(0)
    config = ModelConfig(feature_maps=8)
    sample = zarr.open_array(str(simulated_store / "0"), mode="r")[0]
    low, high = np.percentile(sample, [1.0, 99.8])
    path = tmp_path_factory.mktemp("cluster_model") / "model.pt"
    normalisation = Normalisation(float(low), float(high))
    save_checkpoint(
        Checkpoint("oce", config, normalisation, UNet(config).state_dict(), "tyx"), path
    )
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_network_tasks_run_only_on_gpu_resource_workers(tmp_path, simulated_store, model):
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as local,
    ):
        assert network_resources(local) is None
        reference = tmp_path / "local.zarr"
        predict(simulated_store, reference, model, client=local, **SETTINGS)

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    common = ["--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard", "--no-nanny"]
    processes = [
        subprocess.Popen(
            [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port)]
            + ["--no-dashboard"],
            **quiet,
        )
    ]
    try:
        processes.append(
            subprocess.Popen(
                [BIN / "dask", "worker", address, *common, "--resources", "GPU=1"], **quiet
            )
        )
        processes.append(subprocess.Popen([BIN / "dask", "worker", address, *common], **quiet))
        with Client(address, timeout=60) as remote:
            remote.wait_for_workers(2, timeout=120)
            workers = remote.scheduler_info(n_workers=-1)["workers"]
            gpu = {a for a, w in workers.items() if (w.get("resources") or {}).get("GPU")}
            assert len(gpu) == 1 and len(workers) == 2
            assert network_resources(remote) == {"GPU": 1}
            assert network_resources(remote, "cpu") is None
            out = tmp_path / "remote.zarr"
            with get_task_stream(client=remote) as stream:
                result = predict(simulated_store, out, model, client=remote, **SETTINGS)
            ran: dict[str, set[str]] = {}
            for task in stream.data:
                ran.setdefault(str(task["key"]).split("-")[0], set()).add(task["worker"])
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=30)
    assert result.objects > 0
    assert ran["oce_task"] == gpu  # every network task, on the GPU worker only
    other = set(workers) - gpu
    # clustering and labels are unrestricted: the plain worker took part in them
    assert (ran.get("centres_task", set()) | ran.get("labels_task", set())) & other, ran
    labels = open_labels(out, "cellulus").data.compute()
    assert np.array_equal(labels, open_labels(reference, "cellulus").data.compute())


def test_embedded_gpu_layout_runs_the_network_on_the_gpu_workers(tmp_path, simulated_store, model):
    """GPU_WORKERS_PER_GPU single-threaded workers per GPU, seeing only their GPU, take every
    network task; on this CPU-only machine they compute on the CPU and the labels are those of
    a plain local cluster."""
    with dask_client(workers=1) as plain:
        reference = tmp_path / "plain.zarr"
        predict(simulated_store, reference, model, client=plain, **SETTINGS)
    with dask_client(workers=1, gpus=1) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        gpu = {a for a, w in workers.items() if (w.get("resources") or {}).get("GPU")}
        assert len(workers) == 1 + GPU_WORKERS_PER_GPU and len(gpu) == GPU_WORKERS_PER_GPU
        assert all(
            workers[a]["nthreads"] == 1 and workers[a]["resources"] == {"GPU": 1} for a in gpu
        )
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        assert all(seen[a] == first for a in gpu)
        out = tmp_path / "gpu.zarr"
        with get_task_stream(client=client) as stream:
            predict(simulated_store, out, model, client=client, **SETTINGS)
        network = {t["worker"] for t in stream.data if str(t["key"]).startswith("oce_task")}
    assert network <= gpu and len(network) > 1
    np.testing.assert_array_equal(
        open_labels(out, "cellulus").data.compute(),
        open_labels(reference, "cellulus").data.compute(),
    )


def _listening() -> set[tuple[int, str, int]]:
    """(pid, ip, port) of the TCP sockets this process and its children listen on."""
    found = set()
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                found.add((process.pid, connection.laddr.ip, connection.laddr.port))
    return found


def test_local_cluster_listens_on_loopback_only():
    before = _listening()
    with dask_client(workers=1) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert workers and all(a.startswith("tcp://127.0.0.1:") for a in workers)
        opened = _listening() - before
    assert opened, "no listening socket found"
    assert {ip for _, ip, _ in opened} == {"127.0.0.1"}, opened
