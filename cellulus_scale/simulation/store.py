"""Write a simulated time-lapse with ground truth to OME-Zarr (``cellulus-scale simulate``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cellulus_scale.config import NGFF_VERSION
from cellulus_scale.io import ome_zarr
from cellulus_scale.io.tracks import table_from_presence, write_track_table
from cellulus_scale.simulation.simulate import SimulationSpec, simulate_frames

GROUND_TRUTH = "ground_truth"


def write_simulation(
    path: str | os.PathLike[str],
    spec: SimulationSpec,
    overwrite: bool = False,
    chunk: int = 256,
    ngff_version: str = NGFF_VERSION,
) -> Path:
    """Simulate ``spec`` frame by frame into ``path``: the image (axes tyx or tzyx) and its
    ground-truth instance labels ``labels/ground_truth`` (IDs kept across frames), whose
    metadata holds the track table (:mod:`cellulus_scale.io.tracks`: ID, first frame, last
    frame, parent; the CTC's man_track.txt), in NGFF ``ngff_version``."""
    spec.validate()
    path = ome_zarr.check_output_path(path, overwrite)
    if path.exists():
        ome_zarr.remove_store(path)
    axes = "tyx" if len(spec.shape) == 2 else "tzyx"
    shape = (spec.frames, *spec.shape)
    chunks = (1, *[min(chunk, s) for s in spec.shape])
    root = ome_zarr.create_group(path, ngff_version)
    ome_zarr.mark_status(root, "incomplete", command="simulate")
    image = ome_zarr.create_level0(root, shape, chunks, np.uint16, dimension_names=axes)
    labels_group = ome_zarr.create_labels(root, GROUND_TRUTH, shape, chunks, np.uint32, axes)
    labels = labels_group["0"]
    divisions = []
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for frame, (raw, truth, divided) in enumerate(simulate_frames(spec)):
        image[frame] = raw
        labels[frame] = truth
        divisions += [[frame, int(m), int(d)] for m, d in divided]
        for nucleus in np.unique(truth[truth > 0]).tolist():
            first.setdefault(nucleus, frame)
            last[nucleus] = frame
    # the z step of anisotropic frames is the z axis's scale (1 for x and y, and for t)
    scale = (1.0,) * len(axes) if spec.z_scale == 1.0 else (1.0, float(spec.z_scale), 1.0, 1.0)
    ome_zarr.finish_multiscale(root, axes, scale, path.stem)
    ome_zarr.finish_labels(root, GROUND_TRUTH, axes, scale)
    # the CTC track file (man_track.txt): ID, first frame, last frame, parent
    parents = {daughter: mother for _, mother, daughter in divisions}
    write_track_table(path, GROUND_TRUTH, table_from_presence(first, last, parents))
    ome_zarr.mark_status(
        root,
        "complete",
        command="simulate",
        divisions=divisions,
        simulation={
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in spec.__dict__.items()
            if k != "z_scale" or v != 1.0  # isotropic: the metadata of earlier versions
        },
    )
    return path
