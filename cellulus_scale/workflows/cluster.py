"""Clusters a run can use besides the local one: the SLURM job scripts of a ``cluster.yaml``
(``cellulus-scale slurm-script``), for review before ``predict --slurm`` submits them."""

from __future__ import annotations

import os

from cellulus_scale.blockwise.slurm import SlurmSpec, job_scripts
from cellulus_scale.errors import UserInputError


def slurm_job_scripts(config: str | os.PathLike[str]) -> dict[str, tuple[int, str]]:
    """For each kind of job of ``config`` (``gpu``, ``cpu``): how many jobs, and the sbatch
    script of each, as ``predict --slurm`` submits them (the scheduler's address and the job's
    name are filled in then). Nothing is submitted."""
    spec = SlurmSpec.load(config)
    try:
        scripts = job_scripts(spec)
    except ImportError:
        raise UserInputError(
            "SLURM clusters need dask-jobqueue", "pip install -e '.[slurm]' (or dask-jobqueue)"
        ) from None
    return {kind: (spec.kinds[kind].jobs, script) for kind, script in scripts.items()}
