"""Where a run executes: an embedded local Dask cluster, or an existing one, reached by its
address (``tcp://`` or ``tls://``, with certificate files) or by a scheduler file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class TLSFiles:
    """The PEM files a client of a ``tls://`` scheduler presents and checks: the certificate
    authority that signed the scheduler's and workers' certificates, and this client's own
    certificate and private key (Dask's TLS is mutual)."""

    ca_file: str
    cert: str
    key: str

    @classmethod
    def from_options(
        cls, ca_file: str | os.PathLike[str] | None, cert: str | os.PathLike[str] | None,
        key: str | os.PathLike[str] | None,
    ) -> TLSFiles | None:  # fmt: skip
        """The files of ``--tls-ca-file``, ``--tls-cert`` and ``--tls-key``, checked (all three
        or none; readable PEM files that belong together), or None when none is given."""
        given = {"--tls-ca-file": ca_file, "--tls-cert": cert, "--tls-key": key}
        if all(v is None for v in given.values()):
            return None
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise UserInputError(
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing",
                "a tls:// scheduler needs all of --tls-ca-file, --tls-cert and --tls-key",
            )
        for name, value in given.items():
            path = Path(value)  # type: ignore[arg-type]
            if not path.is_file():
                raise UserInputError(f"{name} {path}: no such file", "give the path of a PEM file")
            if not os.access(path, os.R_OK):
                raise UserInputError(f"{name} {path} is not readable", "check its permissions")
        files = cls(str(ca_file), str(cert), str(key))
        files.check()
        return files

    def check(self) -> None:
        """Refuse files that are not PEM certificates and keys, or a key of another
        certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cafile=self.ca_file)
        except (ssl.SSLError, ValueError) as error:
            raise UserInputError(
                f"--tls-ca-file {self.ca_file} is not a PEM certificate ({type(error).__name__})",
                "give the certificate authority's certificate in PEM format",
            ) from None
        try:
            context.load_cert_chain(certfile=self.cert, keyfile=self.key)
        except (ssl.SSLError, ValueError) as error:
            raise UserInputError(
                f"--tls-cert {self.cert} and --tls-key {self.key} are not a PEM certificate and"
                f" its private key ({getattr(error, 'reason', None) or type(error).__name__})",
                "give this client's certificate and the key it was made for (unencrypted PEM)",
            ) from None

    def security(self) -> Any:
        """Dask's :class:`distributed.Security` for a client of these files."""
        from distributed import Security

        return Security(
            tls_ca_file=self.ca_file,
            tls_client_cert=self.cert,
            tls_client_key=self.key,
            require_encryption=True,
        )


def read_scheduler_file(path: str | os.PathLike[str]) -> str:
    """The scheduler's address from a scheduler file (``dask scheduler --scheduler-file
    PATH``, the usual handshake on HPC clusters: the scheduler writes it on a shared file
    system, workers and clients read it)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(
            f"--scheduler-file {path}: no such file",
            "start the scheduler with 'dask scheduler --scheduler-file PATH' first, on a file"
            " system this machine sees",
        )
    try:
        address = json.loads(path.read_text())["address"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserInputError(
            f"--scheduler-file {path} is not a Dask scheduler file ({type(error).__name__})",
            "give the file 'dask scheduler --scheduler-file' wrote",
        ) from None
    if not isinstance(address, str) or "://" not in address:
        raise UserInputError(
            f"--scheduler-file {path} holds no scheduler address",
            "give the file 'dask scheduler --scheduler-file' wrote",
        )
    return address


def scheduler_address(
    scheduler: str | None, scheduler_file: str | os.PathLike[str] | None, tls: TLSFiles | None
) -> str | None:
    """The address of the cluster to run on (None: a local cluster), checked against the TLS
    files: a ``tls://`` address needs them, others must not be given them."""
    if scheduler is not None and scheduler_file is not None:
        raise UserInputError(
            "--scheduler and --scheduler-file both name a scheduler", "give one of them"
        )
    address = read_scheduler_file(scheduler_file) if scheduler_file is not None else scheduler
    where = f" (from {scheduler_file})" if scheduler_file is not None else ""
    if address is None:
        if tls is not None:
            raise UserInputError(
                "--tls-ca-file, --tls-cert and --tls-key are for a tls:// scheduler",
                "add --scheduler tls://HOST:PORT (or --scheduler-file), or drop them",
            )
        return None
    if address.startswith("tls://") and tls is None:
        raise UserInputError(
            f"the scheduler at {address}{where} uses TLS",
            "pass --tls-ca-file, --tls-cert and --tls-key (PEM files of your cluster)",
        )
    if tls is not None and not address.startswith("tls://"):
        raise UserInputError(
            f"--tls-ca-file, --tls-cert and --tls-key are for a tls:// scheduler, not {address}"
            f"{where}",
            "start the scheduler with --protocol tls and its certificates, or drop them",
        )
    return address


def _only_slurm(scheduler: object, scheduler_file: object, tls: object) -> None:
    if scheduler is not None or scheduler_file is not None or tls is not None:
        raise UserInputError(
            "--slurm starts its own scheduler", "drop --scheduler, --scheduler-file and --tls-*"
        )


def connection_options(
    scheduler: str | None,
    scheduler_file: str | os.PathLike[str] | None,
    tls_ca_file: str | os.PathLike[str] | None,
    tls_cert: str | os.PathLike[str] | None,
    tls_key: str | os.PathLike[str] | None,
    slurm: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The ``RunOptions`` fields (besides ``scheduler``) that reach a cluster started elsewhere
    or on SLURM, checked before anything is read: files present, a ``tls://`` address with its
    certificates, a valid ``cluster.yaml``."""
    from cellulus_scale.blockwise.slurm import SlurmSpec

    tls = TLSFiles.from_options(tls_ca_file, tls_cert, tls_key)
    spec = None
    if slurm is not None:
        _only_slurm(scheduler, scheduler_file, tls)
        spec = SlurmSpec.load(slurm)
    else:
        scheduler_address(scheduler, scheduler_file, tls)
    return {
        "scheduler_file": str(scheduler_file) if scheduler_file is not None else None,
        "tls": tls,
        "slurm": spec,
    }


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    workers: int | None = None,
    timeout: float = 10.0,
    quiet: bool = True,
    gpus: int = 0,
    scheduler_file: str | os.PathLike[str] | None = None,
    tls: TLSFiles | None = None,
    slurm: Any = None,
) -> Iterator[Client]:
    """A Dask client: on ``scheduler`` (``tcp://`` or ``tls://`` address, the latter with
    ``tls`` files) or the scheduler of ``scheduler_file`` if given, else on a local cluster
    listening on loopback of ``workers`` single-threaded processes (one per core by default,
    less those of the GPUs) and, with ``gpus``, processes per GPU for the network (see
    :func:`gpu_cluster`); or, with ``slurm`` (a :class:`~cellulus_scale.blockwise.slurm.SlurmSpec`),
    on SLURM jobs submitted for the run and cancelled after it."""
    if quiet:
        for name in (
            "distributed",
            "distributed.worker",
            "distributed.nanny",
            "distributed.scheduler",
            "distributed.comm.tcp",
        ):
            logging.getLogger(name).setLevel(logging.ERROR)
    if slurm is not None:
        _only_slurm(scheduler, scheduler_file, tls)
        with slurm_client(slurm, quiet) as client:
            yield client
        return
    scheduler = scheduler_address(scheduler, scheduler_file, tls)
    if scheduler is not None:
        try:
            if tls is not None:
                client = Client(scheduler, timeout=timeout, security=tls.security())
            else:
                client = Client(scheduler, timeout=timeout)
        except Exception as error:
            reason = type(error).__name__
            hint = (
                "check the address and that --tls-ca-file signed the scheduler's certificate and"
                " --tls-cert"
                if tls is not None
                else "check the address, start it with 'dask scheduler', or drop --scheduler to"
                " run on a local cluster"
            )
            raise UserInputError(
                f"cannot reach the Dask scheduler at {scheduler} ({reason})", hint
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


@contextlib.contextmanager
def slurm_client(spec: Any, quiet: bool = True) -> Iterator[Client]:
    """A client of a cluster of SLURM jobs (:mod:`cellulus_scale.blockwise.slurm`), once its
    first workers (and a GPU worker where GPU jobs were asked for) have joined."""
    from cellulus_scale.blockwise.slurm import slurm_cluster, wait_for_workers

    cluster = slurm_cluster(spec, logging.CRITICAL if quiet else logging.WARNING)
    try:
        client = Client(cluster)
        try:
            wait_for_workers(client, spec)
            check_versions(client, f"the SLURM jobs of {spec.source}")
            yield client
        finally:
            client.close()
    finally:
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
