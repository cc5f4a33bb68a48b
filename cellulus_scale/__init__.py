"""cellulus-scale: unsupervised cell instance segmentation (Cellulus) for large OME-Zarr videos.

The functions behind the commands can be imported from here, e.g. ``from cellulus_scale import
predict``: ``write_simulation``, ``train``, ``train_supervised``, ``predict``, ``link``,
``evaluate``, ``evaluate_tracks``, ``export_ctc``, ``preview_frame``, ``export``,
``run_demo`` (with ``SimulationSpec``) and ``slurm_job_scripts``; ``is_url`` says whether a
path names object storage (``s3://...``). Each is imported from its module when first used, so
importing the package imports neither torch nor Dask.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_PUBLIC = {
    "SimulationSpec": "cellulus_scale.simulation.simulate",
    "write_simulation": "cellulus_scale.simulation.store",
    "train": "cellulus_scale.training.oce",
    "train_supervised": "cellulus_scale.training.stardist",
    "predict": "cellulus_scale.workflows.predict",
    "link": "cellulus_scale.workflows.link",
    "refine": "cellulus_scale.workflows.refine",
    "evaluate": "cellulus_scale.evaluation.evaluate",
    "evaluate_tracks": "cellulus_scale.evaluation.tracks",
    "export_ctc": "cellulus_scale.tracking.export",
    "export": "cellulus_scale.workflows.export",
    "preview_frame": "cellulus_scale.viz.snapshot",
    "run_demo": "cellulus_scale.workflows.demo",
    "slurm_job_scripts": "cellulus_scale.workflows.cluster",
    "is_url": "cellulus_scale.io.location",
}

__all__ = [
    "SimulationSpec",
    "__version__",
    "evaluate",
    "evaluate_tracks",
    "export_ctc",
    "link",
    "export",
    "is_url",
    "predict",
    "preview_frame",
    "refine",
    "run_demo",
    "slurm_job_scripts",
    "train",
    "train_supervised",
    "write_simulation",
]

if TYPE_CHECKING:
    from cellulus_scale.evaluation.evaluate import evaluate
    from cellulus_scale.evaluation.tracks import evaluate_tracks
    from cellulus_scale.io.location import is_url
    from cellulus_scale.simulation.simulate import SimulationSpec
    from cellulus_scale.simulation.store import write_simulation
    from cellulus_scale.tracking.export import export_ctc
    from cellulus_scale.training.oce import train
    from cellulus_scale.training.stardist import train_supervised
    from cellulus_scale.viz.snapshot import preview_frame
    from cellulus_scale.workflows.cluster import slurm_job_scripts
    from cellulus_scale.workflows.demo import run_demo
    from cellulus_scale.workflows.export import export
    from cellulus_scale.workflows.link import link
    from cellulus_scale.workflows.predict import predict
    from cellulus_scale.workflows.refine import refine


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cellulus_scale' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
