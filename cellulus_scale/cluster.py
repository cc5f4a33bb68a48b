"""Where a run executes: an embedded local Dask cluster, or an existing one."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster

from cellulus_scale.errors import UserInputError


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
) -> Iterator[Client]:
    """A Dask client: on ``scheduler`` (``tcp://`` or ``tls://`` address) if given, else on a
    local cluster of ``workers`` processes (one per core by default) listening on loopback."""
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
    count = workers if workers is not None else cpu_count()
    if count < 1:
        raise UserInputError(f"--workers must be at least 1, got {count}", "use e.g. --workers 2")
    cluster = LocalCluster(
        n_workers=count,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        # a failed task is reported once, by the client; the workers' own 'Compute Failed'
        # log lines (level ERROR) would break the one-line error of the command line
        silence_logs=logging.CRITICAL if quiet else logging.WARNING,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


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
    ADDRESS --nthreads 1 --resources GPU=1``), else None. The network tasks are then restricted
    to such workers (one task per GPU at a time) while the other stages run on every worker;
    ``device="cpu"`` lifts the restriction."""
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
