"""A Dask cluster of SLURM jobs (``predict --slurm cluster.yaml``), with dask-jobqueue.

The cluster is described by a small YAML file: the account, partition and time limit, what each
job runs first (``module load``, a virtual environment), and two kinds of jobs: **GPU jobs**,
each with one GPU (``--gres=gpu:1``) and a few single-threaded worker processes that see it
(``CUDA_VISIBLE_DEVICES``) and advertise one ``GPU`` resource each, so that the network tasks
run there; and **CPU jobs** of single-threaded workers for the other stages. The scheduler runs
in the process that calls :func:`slurm_cluster` (``predict``, on the login node or in a job of
its own); the jobs are submitted with ``sbatch`` when the run starts and cancelled with
``scancel`` when it ends. ``cellulus-scale slurm-script cluster.yaml`` prints the job scripts
without submitting anything. Example (README, "SLURM")::

    account: mylab
    queue: normal
    walltime: "02:00:00"
    interface: ib0            # the network the compute nodes reach this machine on
    prologue:
      - module load cuda/12.4
      - source /shared/envs/cellulus/bin/activate
    gpu: {jobs: 2, queue: gpu, memory: 64GB}
    cpu: {jobs: 4, cores: 16, memory: 32GB}
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellulus_scale.errors import UserInputError

#: Worker processes per GPU job (one GPU each): as on a local machine, a few single-threaded
#: processes keep a GPU busy where one cannot (README, "Where it runs").
WORKERS_PER_GPU = 4
#: How long ``predict --slurm`` waits for the first jobs to start, by default.
WAIT_MINUTES = 30.0

_TOP_KEYS = {
    "account": "sbatch -A",
    "queue": "sbatch -p (partition), for both kinds unless a kind names its own",
    "walltime": "sbatch -t, e.g. '02:00:00'",
    "interface": "network interface the scheduler and workers use, e.g. ib0",
    "python": "the Python that runs the workers (default: this one)",
    "log_directory": "where SLURM writes the jobs' output",
    "local_directory": "fast local disk of the compute nodes, e.g. /tmp or $TMPDIR",
    "prologue": "shell lines every job runs first (module load, source venv)",
    "wait_minutes": "how long predict waits for the first jobs to start",
    "gpu": "the GPU jobs",
    "cpu": "the CPU jobs",
}
_KIND_KEYS = {
    "gpu": {"jobs", "queue", "walltime", "memory", "cores", "workers_per_gpu", "directives"},
    "cpu": {"jobs", "queue", "walltime", "memory", "cores", "processes", "directives"},
}


@dataclass(frozen=True)
class JobKind:
    """One kind of job: how many, where, and the worker processes each runs."""

    jobs: int
    memory: str
    processes: int  # single-threaded worker processes per job
    cores: int  # --cpus-per-task
    queue: str | None = None
    walltime: str | None = None
    directives: tuple[str, ...] = ()  # extra #SBATCH lines


@dataclass(frozen=True)
class SlurmSpec:
    """A cluster of SLURM jobs, as ``cluster.yaml`` describes it (see the module's doc)."""

    account: str | None = None
    queue: str | None = None
    walltime: str | None = "01:00:00"
    interface: str | None = None
    python: str = field(default_factory=lambda: sys.executable)
    log_directory: str | None = None
    local_directory: str | None = None
    prologue: tuple[str, ...] = ()
    wait_minutes: float = WAIT_MINUTES
    gpu: JobKind | None = None
    cpu: JobKind | None = None
    source: str = "cluster.yaml"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SlurmSpec:
        """Read and check a ``cluster.yaml``."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise UserInputError(
                f"--slurm {path}: no such file", "write the cluster's YAML (README, 'SLURM')"
            )
        try:
            values = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise UserInputError(
                f"--slurm {path} is not readable YAML ({type(error).__name__})",
                "fix the file (README, 'SLURM', has an example)",
            ) from None
        return cls.from_dict(values if values is not None else {}, str(path))

    @classmethod
    def from_dict(cls, values: Any, source: str = "cluster.yaml") -> SlurmSpec:
        """Check the values of a ``cluster.yaml``: known keys, types, at least one job."""
        if not isinstance(values, dict):
            raise UserInputError(f"{source} is not a mapping of keys to values", _EXAMPLE)
        _unknown(values, set(_TOP_KEYS), source)
        kinds = {}
        for kind in ("gpu", "cpu"):
            if values.get(kind) is not None:
                kinds[kind] = _job_kind(kind, values[kind], source)
        if not any(k.jobs for k in kinds.values()):
            raise UserInputError(f"{source} asks for no job", "give gpu: {jobs: N, ...} or cpu:")
        prologue = values.get("prologue") or []
        if isinstance(prologue, str):
            prologue = [prologue]
        if not isinstance(prologue, list) or not all(isinstance(p, str) for p in prologue):
            raise UserInputError(f"{source}: prologue must be a list of shell lines", _EXAMPLE)
        text = {k: _text(values, k, source) for k in _TOP_KEYS if k not in _NOT_TEXT}
        return cls(
            account=text["account"],
            queue=text["queue"],
            walltime=text["walltime"] or "01:00:00",
            interface=text["interface"],
            python=text["python"] or sys.executable,
            log_directory=_home(text["log_directory"]),
            local_directory=text["local_directory"],
            prologue=tuple(prologue),
            wait_minutes=_number(values, "wait_minutes", source, WAIT_MINUTES),
            gpu=kinds.get("gpu"),
            cpu=kinds.get("cpu"),
            source=source,
        )

    @property
    def kinds(self) -> dict[str, JobKind]:
        """The kinds of job asked for, GPU first."""
        found = {"gpu": self.gpu, "cpu": self.cpu}
        return {name: kind for name, kind in found.items() if kind is not None and kind.jobs}

    def job_options(self, kind: str) -> dict[str, Any]:
        """The keyword arguments of dask-jobqueue's ``SLURMJob`` for a job of ``kind``."""
        job = self.kinds[kind]
        if kind == "gpu":  # SLURM sets it for --gres=gpu:1; the first GPU where it does not
            environment = ['export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"']
            worker_args = ["--resources", "GPU=1"]
        else:  # CPU workers never touch a GPU, even on a GPU node
            environment = ['export CUDA_VISIBLE_DEVICES=""']
            worker_args = []
        return {
            "config_name": "slurm",
            "job_name": f"cellulus-{kind}",
            "queue": job.queue or self.queue,
            "account": self.account,
            "walltime": job.walltime or self.walltime,
            "cores": job.processes,  # one thread per worker process
            "processes": job.processes,
            "job_cpu": job.cores,
            "memory": job.memory,
            "job_extra_directives": list(job.directives),
            "job_script_prologue": [*self.prologue, *environment],
            "worker_extra_args": worker_args,
            "interface": self.interface,
            "python": self.python,
            "log_directory": self.log_directory,
            "local_directory": self.local_directory,
            "protocol": None,
            "security": None,
        }

    def expected_workers(self) -> int:
        return sum(k.jobs * k.processes for k in self.kinds.values())


_NOT_TEXT = {"prologue", "wait_minutes", "gpu", "cpu"}
_EXAMPLE = "see README, 'SLURM', for an example"


def _unknown(values: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise UserInputError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
            f"use {', '.join(sorted(allowed))}",
        )


def _text(values: dict, key: str, where: str) -> str | None:
    value = values.get(key)
    if value is None:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise UserInputError(f"{where}: {key} must be a text", _EXAMPLE)
    return str(value)


def _home(path: str | None) -> str | None:
    """``~`` expanded: SLURM's -o and -e do not expand it."""
    return os.path.expanduser(path) if path else None


def _number(values: dict, key: str, where: str, default: float) -> float:
    value = values.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise UserInputError(f"{where}: {key} must be a positive number, got {value!r}", _EXAMPLE)
    return float(value)


def _count(values: dict, key: str, where: str, default: int | None, least: int = 0) -> int:
    value = values.get(key, default)
    if value is None:
        raise UserInputError(f"{where}: {key} is missing", _EXAMPLE)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserInputError(
            f"{where}: {key} must be a whole number of at least {least}, got {value!r}", _EXAMPLE
        )
    return value


def _job_kind(kind: str, values: Any, source: str) -> JobKind:
    where = f"{source}, {kind}"
    if not isinstance(values, dict):
        raise UserInputError(f"{where}: give a mapping (e.g. {{jobs: 2, memory: 32GB}})", _EXAMPLE)
    _unknown(values, _KIND_KEYS[kind], where)
    memory = _text(values, "memory", where)
    if memory is None:
        raise UserInputError(f"{where}: memory is missing (per job, e.g. 32GB)", _EXAMPLE)
    if kind == "gpu":
        processes = _count(values, "workers_per_gpu", where, WORKERS_PER_GPU, least=1)
        cores = _count(values, "cores", where, processes, least=1)
    else:
        cores = _count(values, "cores", where, None, least=1)
        processes = _count(values, "processes", where, cores, least=1)
    directives = values.get("directives")
    if directives is None:
        directives = ["--gres=gpu:1"] if kind == "gpu" else []
    if isinstance(directives, str):
        directives = [directives]
    if not isinstance(directives, list) or not all(isinstance(d, str) for d in directives):
        raise UserInputError(f"{where}: directives must be a list of sbatch options", _EXAMPLE)
    return JobKind(
        jobs=_count(values, "jobs", where, 1),
        memory=memory,
        processes=processes,
        cores=cores,
        queue=_text(values, "queue", where),
        walltime=_text(values, "walltime", where),
        directives=tuple(directives),
    )


def wait_for_workers(client: Any, spec: SlurmSpec) -> None:
    """Wait until a worker of the jobs has joined, and a GPU worker where GPU jobs were asked
    for (the network tasks go to GPU workers only once one is there), at most
    ``spec.wait_minutes``."""
    import time

    deadline = time.monotonic() + 60 * spec.wait_minutes
    need_gpu = "gpu" in spec.kinds
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        has_gpu = any((w.get("resources") or {}).get("GPU", 0) > 0 for w in workers)
        if workers and (has_gpu or not need_gpu):
            return
        if time.monotonic() > deadline:
            what = "GPU job" if workers else "job"
            raise UserInputError(
                f"no {what} of {spec.source} started within {spec.wait_minutes:g} minutes",
                "check the queue (squeue --me) and the jobs' logs, or raise wait_minutes",
            )
        time.sleep(1.0)


def job_scripts(spec: SlurmSpec) -> dict[str, str]:
    """The sbatch script of each kind of job, as ``predict --slurm`` submits it (the scheduler's
    address and the worker's name are filled in when it runs). Raises ImportError without
    dask-jobqueue."""
    from dask_jobqueue.slurm import SLURMJob

    return {
        kind: SLURMJob(
            "tcp://SCHEDULER:PORT", name=f"{kind}-JOB", **spec.job_options(kind)
        ).job_script()
        for kind in spec.kinds
    }


def slurm_cluster(spec: SlurmSpec, silence_logs: int) -> Any:
    """A Dask cluster whose workers are the SLURM jobs of ``spec`` (submitted now, cancelled
    when it closes), with its scheduler in this process. dask-jobqueue's ``SLURMJob`` runs each
    job; a ``SpecCluster`` holds both kinds (``SLURMCluster`` has a single kind of job)."""
    try:
        from dask_jobqueue.slurm import SLURMJob
    except ImportError:
        raise UserInputError(
            "--slurm needs dask-jobqueue", "pip install -e '.[slurm]' (or dask-jobqueue)"
        ) from None
    from distributed import Scheduler, SpecCluster

    workers: dict[str, dict[str, Any]] = {}
    for kind, job in spec.kinds.items():
        options = spec.job_options(kind)
        for index in range(job.jobs):
            entry: dict[str, Any] = {"cls": SLURMJob, "options": options}
            if job.processes > 1:  # the job's worker processes, named <job>-0, <job>-1, ...
                entry["group"] = [f"-{i}" for i in range(job.processes)]
            workers[f"{kind}-{index}"] = entry
    scheduler_options: dict[str, Any] = {"dashboard_address": ":0"}
    if spec.interface:
        scheduler_options["interface"] = spec.interface
    scheduler = {"cls": Scheduler, "options": scheduler_options}
    try:
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=silence_logs)
    except (RuntimeError, OSError) as error:  # sbatch refused a job, or is missing
        reason = " ".join(str(error).split())[:200]
        raise UserInputError(
            f"SLURM did not take the jobs of {spec.source} ({reason})",
            "check the account, partition and limits with 'cellulus-scale slurm-script'",
        ) from None
