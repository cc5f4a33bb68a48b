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
        silence_logs=logging.ERROR if quiet else logging.WARNING,
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
