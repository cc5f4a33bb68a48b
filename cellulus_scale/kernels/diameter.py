"""The typical object diameter of an image, from the image alone (numpy in, numbers out).

The foreground (Otsu of the intensity, holes filled) is split into objects by the maxima of its
distance transform: every maximum is the centre of an inscribed disc, and a maximum within
1.6 inscribed radii of a deeper one is the same object (non-maximum suppression). The typical
diameter is that of a disc (or, in 3D, a ball) of the mean foreground area (volume) per object.
Unlike scale-space blob detection, it is not drawn to the texture inside large nuclei
(README, "Diameter estimate").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.filters import threshold_otsu

#: An inscribed-disc centre closer than this many of its radii to a deeper one is suppressed.
SUPPRESSION_RADII = 1.6
#: Maxima of the distance transform shallower than this (in pixels) are not object centres.
MIN_RADIUS = 2.0


def foreground_threshold(samples: np.ndarray) -> float:
    """Otsu's threshold of intensity samples (from several frames)."""
    return float(threshold_otsu(samples))


def object_area_and_count(
    image: np.ndarray, threshold: float, sampling: Sequence[float] | None = None
) -> tuple[float, int]:
    """The foreground area (volume) of one 2D (3D) frame above ``threshold``, in units of the
    in-plane pixel, and its number of objects. ``sampling``: the voxel size per axis in
    in-plane pixels (e.g. (2.18, 1, 1) for a z step of 2.18 pixels)."""
    spacing = tuple(float(s) for s in (sampling or (1.0,) * image.ndim))
    foreground = ndimage.binary_fill_holes(image > threshold)
    foreground = ndimage.binary_opening(foreground)  # drop single-pixel noise
    if not foreground.any():
        return 0.0, 0
    distance = ndimage.distance_transform_edt(foreground, sampling=spacing)
    peaks = (distance == ndimage.maximum_filter(distance, size=3)) & (distance >= MIN_RADIUS)
    where = np.nonzero(peaks)
    radii = distance[where]
    order = np.argsort(-radii, kind="stable")
    points = (np.stack(where, axis=1) * np.asarray(spacing))[order]
    radii = radii[order]
    tree = cKDTree(points)
    taken = np.zeros(len(points), dtype=bool)
    count = 0
    for index in range(len(points)):
        if taken[index]:
            continue
        count += 1
        taken[tree.query_ball_point(points[index], SUPPRESSION_RADII * radii[index])] = True
    return float(foreground.sum() * math.prod(spacing)), count


def diameter_from(area: float, count: int, spatial_dims: int) -> float:
    """The diameter of a disc (2D) or ball (3D) of ``area / count``; nan without objects."""
    if count == 0 or area <= 0:
        return math.nan
    mean = area / count
    if spatial_dims == 3:
        return (6.0 * mean / math.pi) ** (1.0 / 3.0)
    return 2.0 * math.sqrt(mean / math.pi)
