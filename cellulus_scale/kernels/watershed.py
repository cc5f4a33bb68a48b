"""Classical unsupervised baseline: global Otsu threshold + distance-transform watershed.

The threshold is computed once for the whole data set (:func:`otsu_from_histogram` on a global
histogram) and passed to :func:`watershed_labels`, which segments one block or frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from cellulus_scale.errors import UserInputError

# Sigma (pixels) of the Gaussian that lightly smooths the distance transform before seeding.
SEED_SMOOTHING_SIGMA = 1.0
# Objects smaller than this fraction of a disc/ball of the given diameter are dropped.
MIN_SIZE_FRACTION = 0.1


def otsu_from_histogram(counts: np.ndarray, edges: np.ndarray) -> float:
    """Otsu threshold of a histogram (``counts`` per bin, ``edges`` of length ``len(counts)+1``).

    Foreground is ``image > threshold``. The threshold is a bin centre. If only one bin is
    populated there is no contrast and its upper edge is returned (nothing is foreground).
    """
    counts = np.asarray(counts, dtype=float).ravel()
    edges = np.asarray(edges, dtype=float).ravel()
    if edges.size != counts.size + 1:
        raise UserInputError(
            f"histogram has {counts.size} counts but {edges.size} bin edges",
            "pass bin edges of length len(counts) + 1, as returned by numpy.histogram",
        )
    if counts.size == 0 or not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise UserInputError(
            "histogram counts must be finite, non-negative and non-empty",
            "pass the counts returned by numpy.histogram",
        )
    populated = np.flatnonzero(counts)
    if populated.size == 0:
        raise UserInputError("histogram is empty (all counts are 0)", "histogram a non-empty image")
    if populated.size == 1:
        return float(edges[populated[0] + 1])
    centers = 0.5 * (edges[:-1] + edges[1:])
    return float(threshold_otsu(hist=(counts, centers)))


def min_object_size(diameter: float, ndim: int, spacing: Sequence[float] | None = None) -> float:
    """Smallest kept object size in pixels (voxels): 0.1 of the area (2D) or volume (3D) of a
    ``diameter`` object; ``spacing``: the voxel size per axis in the diameter's unit."""
    radius = diameter / 2.0
    if ndim == 2:
        return MIN_SIZE_FRACTION * math.pi * radius**2
    voxel = 1.0 if spacing is None else float(np.prod(spacing))
    return MIN_SIZE_FRACTION * 4.0 / 3.0 * math.pi * radius**3 / voxel


def watershed_markers(
    image: np.ndarray,
    threshold: float,
    diameter: float,
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """Seed markers of the baseline: (markers, count, distance transform, foreground).
    ``spacing``: the voxel size per axis in the diameter's unit (None: square pixels); the
    distance transform, its smoothing and the seeds' separation are then physical."""
    foreground = image > threshold
    if not foreground.any():
        return np.zeros(image.shape, np.int32), 0, np.zeros(image.shape), foreground
    distance = ndimage.distance_transform_edt(foreground, sampling=spacing)
    sigma = SEED_SMOOTHING_SIGMA if spacing is None else [SEED_SMOOTHING_SIGMA / s for s in spacing]
    smoothed = ndimage.gaussian_filter(distance, sigma) * foreground
    components, n_components = ndimage.label(foreground)
    separation = max(1, int(diameter / 2))
    if spacing is None:
        footprint = None
    else:  # the separation along each axis in its own pixels; 1 keeps plateaus apart
        footprint = np.ones([2 * max(1, int(diameter / 2 / s)) + 1 for s in spacing], bool)
        separation = 1
    seeds = peak_local_max(
        smoothed,
        min_distance=separation,
        footprint=footprint,
        labels=components,
        exclude_border=False,
    ).reshape(-1, image.ndim)

    seeded = np.zeros(n_components + 1, bool)
    seeded[components[tuple(seeds.T)]] = True
    missing = np.flatnonzero(~seeded[1:]) + 1
    if missing.size:
        extra = ndimage.maximum_position(smoothed, components, index=missing)
        seeds = np.concatenate(
            [seeds, np.asarray(extra, dtype=seeds.dtype).reshape(-1, image.ndim)]
        )

    # Adjacent seeds (a plateau of equal maxima) form one marker; the connectivity matches the
    # components', so a marker never spans two components.
    peak_mask = np.zeros(image.shape, bool)
    peak_mask[tuple(seeds.T)] = True
    markers, n_markers = ndimage.label(peak_mask)
    return markers, n_markers, distance, foreground


def marker_positions(markers: np.ndarray, count: int) -> np.ndarray:
    """One representative pixel per marker (its first pixel in raster order), (count, ndim)."""
    if count == 0:
        return np.zeros((0, markers.ndim), dtype=np.int64)
    flat = markers.ravel()
    order = np.flatnonzero(flat)
    first = np.unique(flat[order], return_index=True)[1]
    return np.stack(np.unravel_index(order[first], markers.shape), axis=1)


def watershed_from_markers(
    distance: np.ndarray,
    foreground: np.ndarray,
    markers: np.ndarray,
    diameter: float,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Flood ``-distance`` from ``markers`` (any IDs) inside the foreground; drop small objects
    (:func:`min_object_size`, with the voxel size ``spacing``)."""
    segmented = watershed(-distance, markers, mask=foreground)
    ids, compact = np.unique(segmented, return_inverse=True)
    compact = compact.reshape(segmented.shape)
    sizes = np.bincount(compact.ravel())
    small = sizes < min_object_size(diameter, segmented.ndim, spacing)
    small[ids == 0] = False
    segmented[small[compact]] = 0
    return segmented


def watershed_labels(
    image: np.ndarray,
    threshold: float,
    diameter: float,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Segment a 2D or 3D block into instances: threshold, distance transform, seeded watershed.

    Foreground is ``image > threshold``. Seeds are local maxima of the distance transform
    (smoothed with a Gaussian of sigma ``SEED_SMOOTHING_SIGMA``) at least ``int(diameter / 2)``
    pixels apart, found per connected component (adjacent maxima, i.e. plateaus, merge into one
    seed); a component without such a maximum gets one seed at its smoothed-distance maximum.
    The watershed of ``-distance`` is restricted to the foreground; objects smaller than
    :func:`min_object_size` are dropped. ``spacing`` (3D): the voxel size per axis in the
    diameter's unit, so that distances and sizes are physical. Returns ``uint32`` labels
    numbered 1..n (raster order of their seeds), 0 = background. Deterministic.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise UserInputError(
            f"image has {image.ndim} dimensions, expected a 2D or 3D block",
            "segment one frame (one time point, one channel) at a time",
        )
    if not (math.isfinite(diameter) and diameter > 0):
        raise UserInputError(
            f"diameter must be a positive number of pixels, got {diameter}",
            "pass the typical object diameter in pixels",
        )
    if math.isnan(threshold):
        raise UserInputError("threshold is NaN", "compute the threshold from a valid histogram")
    markers, n_markers, distance, foreground = watershed_markers(
        image, threshold, diameter, spacing
    )
    labels = np.zeros(image.shape, np.uint32)
    if n_markers == 0:
        return labels
    segmented = watershed(-distance, markers, mask=foreground)

    sizes = np.bincount(segmented.ravel(), minlength=n_markers + 1)
    keep = sizes >= min_object_size(diameter, image.ndim, spacing)
    keep[0] = False
    relabel = np.where(keep, np.cumsum(keep), 0).astype(np.uint32)
    labels[...] = relabel[segmented]
    return labels
