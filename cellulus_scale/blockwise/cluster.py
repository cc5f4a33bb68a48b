"""Where a run executes: an embedded local Dask cluster, or an existing one."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator

from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

from cellulus_scale.errors import UserInputError

#: Worker processes per local GPU, each running one network task at a time: several processes
#: overlap one block's reading, writing and histograms (Python, under one GIL per process) with
#: the GPU's work on another. Measured on an H200: 4 single-threaded processes kept the GPU
#: busy where 4 threads of one process could not (README, "Where it runs").
GPU_WORKERS_PER_GPU = 4


#: The module every worker of the embedded cluster preloads (SIGINT ignored).
QUIET = "cellulus_scale.blockwise.quiet_worker"


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while worker processes start: they inherit it and never print a traceback
    for a Ctrl-C meant for the command (the preloaded :data:`QUIET` keeps restarted workers so
    too)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to do
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def local_gpu_count() -> int:
    """CUDA GPUs this process can see (0 where torch has no CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    workers: int | None = None,
    timeout: float = 10.0,
    quiet: bool = True,
    gpus: int = 0,
) -> Iterator[Client]:
    """A Dask client: on ``scheduler`` (``tcp://`` or ``tls://`` address) if given, else on a
    local cluster listening on loopback of ``workers`` single-threaded processes (one per core
    by default, less those of the GPUs) and, with ``gpus``, processes per GPU for the network
    (see :func:`gpu_cluster`)."""
    if quiet:
        for name in (
            "distributed",
            "distributed.worker",
            "distributed.nanny",
            "distributed.scheduler",
        ):
            logging.getLogger(name).setLevel(logging.ERROR)
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=timeout)
        except Exception as error:
            reason = type(error).__name__
            raise UserInputError(
                f"cannot reach the Dask scheduler at {scheduler} ({reason})",
                "check the address, start it with 'dask scheduler', or drop --scheduler to run on"
                " a local cluster",
            ) from None
        try:
            check_versions(client, scheduler)
        except BaseException:
            client.close()
            raise
        try:
            yield client
        finally:
            client.close()
        return
    count = workers if workers is not None else max(1, cpu_count() - gpus * GPU_WORKERS_PER_GPU)
    if count < 1:
        raise UserInputError(f"--workers must be at least 1, got {count}", "use e.g. --workers 2")
    # a failed task is reported once, by the client; the workers' own 'Compute Failed' log
    # lines (level ERROR) would break the one-line error of the command line
    silence = logging.CRITICAL if quiet else logging.WARNING
    with sigint_ignored():  # the workers start ignoring Ctrl-C (and keep doing so: QUIET)
        if gpus:
            cluster = gpu_cluster(count, gpus, silence)
        else:
            cluster = LocalCluster(
                n_workers=count,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                silence_logs=silence,
                preload=[QUIET],
            )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def gpu_cluster(cpu_workers: int, gpus: int, silence_logs: int) -> SpecCluster:
    """A local cluster of ``cpu_workers`` single-threaded workers plus, for each GPU,
    :data:`GPU_WORKERS_PER_GPU` single-threaded workers that see only that GPU
    (``CUDA_VISIBLE_DEVICES``) and advertise one ``GPU`` resource each. Network tasks ask for
    one ``GPU`` resource, so they run on these workers (see :func:`network_resources`); the
    other stages run on every worker."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = visible.split(",") if visible else [str(i) for i in range(gpus)]

    def worker(**options: object) -> dict[str, object]:
        return {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "host": "127.0.0.1",
                "dashboard_address": None,
                "silence_logs": silence_logs,
                "memory_limit": "auto",
                "preload": [QUIET],
                **options,
            },
        }

    workers = {f"cpu-{i}": worker() for i in range(cpu_workers)}
    for gpu in range(gpus):
        for i in range(GPU_WORKERS_PER_GPU):
            workers[f"gpu-{gpu}-{i}"] = worker(
                resources={"GPU": 1}, env={"CUDA_VISIBLE_DEVICES": names[gpu]}
            )
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
    }
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=silence_logs)


def threads_per_host(client: Client) -> dict[str, int]:
    """Worker threads on each host of the cluster, so a task can size torch's thread pool to
    (host cores / worker threads on that host)."""
    totals: dict[str, int] = {}
    for address, worker in client.scheduler_info(n_workers=-1)["workers"].items():
        host = address.rsplit(":", 1)[0]
        totals[host] = totals.get(host, 0) + int(worker.get("nthreads", 1))
    return totals


def network_resources(client: Client, device: str = "auto") -> dict[str, float] | None:
    """``{"GPU": 1}`` when a worker of the cluster advertises a ``GPU`` resource (``dask worker
    ADDRESS --nworkers 4 --nthreads 1 --resources GPU=1``: 4 network tasks at once per GPU),
    else None. The network tasks are then restricted to such workers while the other stages run
    on every worker; ``device="cpu"`` lifts the restriction."""
    if device == "cpu":
        return None
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if any((w.get("resources") or {}).get("GPU", 0) > 0 for w in workers):
        return {"GPU": 1}
    return None


def check_versions(client: Client, address: str) -> None:
    """Refuse a cluster whose scheduler or workers run another Python (major.minor), dask or
    distributed than this process, or whose workers have another cellulus-scale (or none):
    Dask's messages and pickled tasks are only reliable between identical versions."""
    try:
        versions = client.get_versions(packages=["cellulus_scale"])
    except Exception as error:  # an incompatible scheduler may not even answer this
        raise UserInputError(
            f"the Dask scheduler at {address} does not report its versions"
            f" ({type(error).__name__}); it may run another version of dask or distributed",
            "install the same Python, dask, distributed and cellulus-scale versions on every"
            " machine of the cluster",
        ) from None
    mine = versions["client"]["packages"]
    others = [(f"scheduler at {address}", versions["scheduler"], False)]
    others += [(f"worker {w}", v, True) for w, v in sorted(versions["workers"].items())]
    for where, info, is_worker in others:
        theirs = (info or {}).get("packages", {})
        for package in ("python", "dask", "distributed", "cellulus_scale"):
            if package == "cellulus_scale" and not is_worker:
                continue  # the scheduler never imports the package
            mine_v, theirs_v = mine.get(package), theirs.get(package)
            if package == "python":  # 3.11.7.final.0: patch releases are compatible
                mine_v, theirs_v = (".".join(str(v).split(".")[:2]) for v in (mine_v, theirs_v))
            if theirs_v != mine_v:
                raise UserInputError(
                    f"the Dask {where} runs {package.replace('_', '-')}"
                    f" {theirs_v or '(not installed)'}, this machine {mine_v}",
                    "install the same Python, dask, distributed and cellulus-scale versions on"
                    " every machine of the cluster",
                )
