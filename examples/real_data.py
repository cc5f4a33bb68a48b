"""Shared by the benchmarks: a sample of the fields of a real annotated store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellulus_scale.io import ome_zarr


def sample_fields(video: Path, count: int, folder: Path) -> Path:
    """A store of ``count`` evenly spaced fields (time points) of ``video`` and their truth."""
    import dask.array as da

    image = ome_zarr.open_image(video)
    truth = ome_zarr.open_labels(video, "ground_truth")
    picked = np.linspace(0, image.data.shape[0] - 1, count).round().astype(int)
    path = folder / f"{video.stem}-{count}.zarr"
    root = ome_zarr.write_image(path, image.data[picked], image.axes, image.scale, path.stem)
    labels = da.asarray(truth.data[picked])
    ome_zarr.write_labels(root, "ground_truth", labels, truth.axes, truth.scale)
    return path
