"""Estimate the typical object diameter of a video from a sample of its frames
(:func:`estimate_diameter`; the kernel is :mod:`cellulus_scale.kernels.diameter`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr
from cellulus_scale.kernels.diameter import (
    diameter_from,
    foreground_threshold,
    object_area_and_count,
)

#: Frames read for the estimate (evenly spaced), and the largest crop read of each, per axis.
SAMPLE_FRAMES = 8
SAMPLE_SIDE = 1024
SAMPLE_DEPTH = 128


@dataclass(frozen=True)
class DiameterEstimate:
    """The typical diameter (in-plane pixels) and what it rests on."""

    diameter: float
    objects: int
    frames: int


def estimate_diameter(
    image_path: str | os.PathLike[str], axes: str | None = None, voxel_size=None
) -> DiameterEstimate:
    """The typical object diameter in pixels, from up to :data:`SAMPLE_FRAMES` evenly spaced
    frames: one Otsu threshold over all of them, then the foreground per object
    (:func:`~cellulus_scale.kernels.diameter.object_area_and_count`). ``voxel_size``: the
    spatial axes' steps in in-plane pixels (3D: the z step matters)."""
    image = ome_zarr.open_image(image_path, axes)
    picked = ome_zarr.sample_frames(image, SAMPLE_FRAMES)
    regions = [
        ome_zarr.sample_region(image, int(t), SAMPLE_SIDE, SAMPLE_DEPTH).mean(axis=0)
        for t in picked
    ]
    pooled = np.concatenate([r.ravel()[:: max(1, r.size // 200_000)] for r in regions])
    low, high = np.percentile(pooled, [1.0, 99.8])
    if not np.isfinite([low, high]).all() or high <= low:
        raise UserInputError(
            f"cannot estimate the object diameter of {image.path}: its sampled frames have no"
            " contrast",
            "pass --diameter D (the typical object diameter in pixels)",
        )
    threshold = foreground_threshold(np.clip(pooled, low, high))
    area, count = 0.0, 0
    for region in regions:
        a, c = object_area_and_count(np.clip(region, low, high), threshold, voxel_size)
        area, count = area + a, count + c
    diameter = diameter_from(area, count, image.spatial_dims)
    side = min(image.canonical_shape[-2:])
    if not math.isfinite(diameter) or diameter < 3 or diameter > side / 2:
        found = "no objects" if not math.isfinite(diameter) else f"{diameter:.1f} px"
        raise UserInputError(
            f"cannot estimate the object diameter of {image.path} (found {found})",
            "pass --diameter D (the typical object diameter in pixels)",
        )
    return DiameterEstimate(float(diameter), count, len(picked))
