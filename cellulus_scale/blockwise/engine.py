"""The blockwise engine: runs stages of block tasks on Dask, after daisy's model of a task (a
read region, a write region, a process function and a done check). It knows no method.

A :class:`Stage` is a name and a process function ``(plan, frame, block, *shared) -> result``
that reads its read-region of the input or of earlier outputs, writes only its block's core,
and returns a small dict of numpy arrays. The engine records every result in a marker file
``OUT.zarr/.cellulus-scale/<stage>/<frame>_<block>.npz`` and returns the recorded result of a
finished block instead of computing it again: that is the done check, and what ``--resume``
relies on. Between stages a method reduces the results (e.g. whole-video statistics) and
passes them on as shared arguments.

A :class:`Session` is one run: its Dask client (given, or a local cluster started for it), the
plan sized to the cluster's workers, and the prepared output store.
"""

from __future__ import annotations

import contextlib
import io
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from cellulus_scale.blockwise.blocks import Block
from cellulus_scale.blockwise.plan import Plan
from cellulus_scale.blockwise.store import (
    FeatureImage,
    prepare_labels,
    prepare_output,
    status_group,
)
from cellulus_scale.errors import UserInputError
from cellulus_scale.io.location import Location
from cellulus_scale.io.ome_zarr import OmeImage, mark_status

#: A stage's process function: (plan, frame, block, *shared) -> small result.
Process = Callable[..., dict[str, np.ndarray]]


@dataclass(frozen=True)
class Stage:
    """One task per (frame, block) of the video."""

    name: str  # the marker folder, and the key of the count of blocks computed
    process: Process
    label: str | None = None  # the progress bar's and error messages' name (default: name)
    gpu: bool = False  # runs the network: on the GPU workers where the cluster has any
    recorded: bool = True  # False: no marker, computed again on --resume (cheap passes)

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class RunOptions:
    """Where and how a run executes."""

    scheduler: str | None = None  # address of a Dask scheduler; None: a local cluster
    workers: int | None = None  # local cluster's CPU workers (default: one per core)
    client: Any = None  # a distributed.Client to run on instead
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    scheduler_file: str | None = None  # a Dask scheduler file naming the scheduler instead
    tls: Any = None  # blockwise.cluster.TLSFiles for a tls:// scheduler
    slurm: Any = None  # blockwise.slurm.SlurmSpec: a cluster of SLURM jobs for the run

    @property
    def remote(self) -> bool:
        """Whether the run's workers are not local processes."""
        return any(v is not None for v in (self.scheduler, self.scheduler_file, self.slurm))


# --- markers: what is done, for --resume -----------------------------------------------------


def marker_name(frame: int, block: Block) -> str:
    return f"{frame}_{block.name}.npz"


def marker_path(plan: Plan, stage: str, frame: int, block: Block) -> Location:
    return plan.work_path / stage / marker_name(frame, block)


def _save_marker(path: Location, **values: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **values)  # a block's histogram: tens of kB uncompressed
    path.write_bytes(buffer.getvalue())  # whole or not at all


def _load_marker(path: Location) -> dict[str, np.ndarray] | None:
    try:
        stored = path.read_bytes()
    except FileNotFoundError:
        return None
    with np.load(io.BytesIO(stored)) as data:
        return {k: data[k] for k in data.files}


def recorded_task(
    stage: str, process: Process, plan: Plan, frame: int, block: Block, *shared: Any
) -> dict[str, np.ndarray]:
    """``process`` on one block, unless its result is recorded: then that result."""
    marker = marker_path(plan, stage, frame, block)
    done = _load_marker(marker)
    if done is not None:
        return done
    result = process(plan, frame, block, *shared)
    _save_marker(marker, **result)
    return result


@dataclass
class Session:
    """A run in progress: its client, plan and output, the blocks each stage computed (rather
    than found recorded) and the seconds of each part."""

    client: Any
    plan: Plan
    image: OmeImage
    root: zarr.Group
    progress: bool = True
    local: bool = True  # on a cluster started for the run (on this machine)
    features: Sequence[FeatureImage] = ()  # the feature images prepared in the output
    recomputed: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def run(
        self,
        stage: Stage,
        shared: Sequence[Any] = (),
        per_frame: Sequence[Sequence[Any]] | None = None,
        collect: Callable[[dict[str, np.ndarray]], None] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Run ``stage`` on every (frame, block): ``stage.process(plan, frame, block, *shared,
        *per_frame[frame])``. Returns the results in order, or hands each to ``collect``."""
        from dask.utils import funcname

        from cellulus_scale.blockwise.cluster import network_resources

        plan, work = self.plan, self.plan.work
        if stage.recorded:
            self.recomputed[stage.name] = len(work) - self.count_done(stage)
            function, head = recorded_task, (stage.name, stage.process)
        else:
            function, head = stage.process, ()
        # GPU workers, if any, run the network
        resources = network_resources(self.client, plan.device) if stage.gpu else None
        args = [
            (*head, plan, f, b, *shared, *(per_frame[f] if per_frame is not None else ()))
            for f, b in work
        ]
        prefix = funcname(stage.process)  # the tasks' names, on the dashboard too
        return self._submit(stage.title, function, args, prefix, collect, resources)

    def _submit(
        self,
        name: str,
        function: Callable,
        args: list[tuple],
        prefix: str,
        collect: Callable[[Any], None] | None,
        resources: dict[str, float] | None,
    ) -> list[Any]:
        """Run ``function`` on every argument tuple (tasks keyed ``<prefix>-<uuid>``, retried
        twice); return the results in order, or hand each to ``collect`` as it arrives (and
        return nothing) so that they need not all be held. ``resources`` (e.g. ``{"GPU": 1}``)
        restricts the tasks to workers that advertise them."""
        from distributed import as_completed
        from tqdm.auto import tqdm

        client, output, progress = self.client, self.plan.output_path, self.progress
        futures = [
            client.submit(
                function, *a, key=f"{prefix}-{uuid.uuid4()}", retries=2, resources=resources
            )
            for a in args
        ]
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(futures)
        with tqdm(
            total=len(futures), desc=name, unit="block", disable=None if progress else True
        ) as bar:
            try:
                for future in as_completed(futures):
                    if collect is None:
                        results[index[future.key]] = future.result()
                    else:
                        collect(future.result())
                        future.release()
                    bar.update()
            except OSError as error:  # a full disk or a read-only output, met by a task
                client.cancel(futures)
                if error.errno is None:  # e.g. distributed's CommClosedError: not a file's error
                    raise
                raise UserInputError(
                    f"{error.strerror} in the output {output} (stage {name})",
                    "free space or make it writable, then rerun the same command with --resume",
                ) from None
            except BaseException:
                client.cancel(futures)
                raise
        return results if collect is None else []

    def count_done(self, stage: Stage) -> int:
        """The blocks whose result ``stage`` has recorded."""
        found = set((self.plan.work_path / stage.name).names())
        return sum(marker_name(f, b) in found for f, b in self.plan.work)

    def scatter(self, per_frame: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """Send each frame's values to the cluster once, for :meth:`run`'s ``per_frame``."""
        return [self.client.scatter(list(values), broadcast=False) for values in per_frame]

    def record(self, **details: Any) -> None:
        """Record details (e.g. statistics) in the output's status, still incomplete."""
        mark_status(status_group(self.plan, self.root), "incomplete", **details)

    def prepare_labels(self, objects: int, written_by: Stage) -> None:
        """Create the label array for ``objects`` objects unless a resumed run has it in the
        right dtype; a new array voids the blocks ``written_by`` recorded before."""
        if prepare_labels(self.plan, self.image, self.root, objects):
            folder = self.plan.work_path / written_by.name
            folder.remove_files([name for name in folder.names() if name.endswith(".npz")])

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Record the seconds the body takes as ``timings[part]``."""
        start = time.perf_counter()
        yield
        self.timings[part] = time.perf_counter() - start


@contextlib.contextmanager
def _client_of(options: RunOptions, plan: Plan, network: bool) -> Iterator[Any]:
    """``options.client``, or a cluster started for the run (with a worker per GPU where a
    ``network`` runs on GPUs)."""
    from cellulus_scale.blockwise.cluster import dask_client, local_gpu_count

    if options.client is not None:
        yield options.client
        return
    uses_gpu = network and plan.device != "cpu" and not options.remote
    gpus = local_gpu_count() if uses_gpu else 0
    with dask_client(
        options.scheduler,
        options.workers,
        gpus=gpus,
        scheduler_file=options.scheduler_file,
        tls=options.tls,
        slurm=options.slurm,
    ) as dask:
        if options.progress and dask.dashboard_link:
            print(f"Dask dashboard: {dask.dashboard_link}", flush=True)
        yield dask


@contextlib.contextmanager
def run_session(
    plan: Plan,
    image: OmeImage,
    options: RunOptions,
    features: Sequence[FeatureImage] = (),
    network: bool = False,
) -> Iterator[Session]:
    """The session of a run: on ``options.client``, or on a cluster started for it (with a
    worker per GPU where a ``network`` runs on GPUs), with the plan sized to its workers and
    the output store prepared."""
    with _client_of(options, plan, network) as dask:
        root = prepare_output(plan, image, options.overwrite, options.resume, features)
        local = options.client is None and not options.remote
        yield Session(dask, plan, image, root, options.progress, local, tuple(features))


@contextlib.contextmanager
def attach_session(
    plan: Plan, image: OmeImage, root: zarr.Group, options: RunOptions
) -> Iterator[Session]:
    """A session that adds stages to an existing store ``root`` (e.g. linking a finished
    output), on ``options.client`` or on a cluster started for it; its recorded block results
    live under the store's work folder as a run's do."""
    with _client_of(options, plan, network=False) as dask:
        local = options.client is None and not options.remote
        yield Session(dask, plan, image, root, options.progress, local)
