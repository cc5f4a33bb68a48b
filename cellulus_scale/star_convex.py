"""Star-convex polygon geometry for the supervised (StarDist) model: pure numpy kernels.

The radial distances, the polygon overlap used by non-maximum suppression and the object
probability come from the ``stardist`` package (its C++ kernels, used without TensorFlow:
only ``stardist.geometry``, ``stardist.nms`` and ``stardist.utils``); this module fixes the
conventions around them that blockwise prediction needs:

- rays: angle ``2 pi k / n`` with ``dy = sin``, ``dx = cos`` (StarDist's convention);
- suppression visits candidates in a deterministic order (probability, then global position),
  so that two blocks that see the same candidates keep the same ones;
- rendering draws polygons in a deterministic order (probability ascending, then ID: the
  more probable polygon is drawn last and wins where two overlap) with global IDs, at global
  coordinates, so every block draws the same pixels.

Only 2D is implemented; :func:`check_two_dimensional` refuses 3D with one line.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.draw import polygon as draw_polygon

from cellulus_scale.errors import UserInputError


def check_two_dimensional(spatial_dims: int, where: str) -> None:
    """Refuse 3D data: the star-convex (StarDist) model is implemented for 2D images only."""
    if spatial_dims != 2:
        raise UserInputError(
            f"{where} is {spatial_dims}D, but the supervised StarDist model is implemented for"
            " 2D images only",
            "use the self-supervised model ('cellulus-scale train') for 3D data",
        )


def ray_angles(n_rays: int) -> np.ndarray:
    """Angles of the rays: 2 pi k / n_rays."""
    return np.arange(n_rays) * (2 * np.pi / n_rays)


def _sequential(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n (0 stays background): StarDist's kernel reads uint16."""
    values, inverse = np.unique(labels, return_inverse=True)
    if values[0] != 0:
        inverse = inverse + 1
    if inverse.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError("more than 65535 objects in one crop")
    return inverse.reshape(labels.shape).astype(np.uint16)


def star_distances(labels: np.ndarray, n_rays: int = 32) -> np.ndarray:
    """Radial distances (n_rays, H, W), float32: for every object pixel, the distance along each
    ray to the last pixel of the same object (outside the array counts as background); zero on
    background. Computed on ``labels`` as given, so objects cut by its border are cut."""
    from stardist.geometry import star_dist

    if labels.ndim != 2:
        raise ValueError(f"star_distances takes a 2D label image, got {labels.ndim}D")
    distances = star_dist(_sequential(labels), n_rays)
    return np.ascontiguousarray(np.moveaxis(distances, -1, 0), dtype=np.float32)


def object_probability(labels: np.ndarray) -> np.ndarray:
    """StarDist's object probability: each object's Euclidean distance transform divided by its
    maximum (1 at the object's innermost pixel, small at its border, 0 on background)."""
    from stardist.utils import edt_prob

    if not np.any(labels):
        return np.zeros(labels.shape, np.float32)
    return np.asarray(edt_prob(_sequential(labels)), dtype=np.float32)


def touching_border(labels: np.ndarray) -> np.ndarray:
    """Mask of the pixels whose object touches the border of ``labels`` (cut objects)."""
    edge = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        index = [slice(None)] * labels.ndim
        for end in (0, -1):
            index[axis] = end
            edge[tuple(index)] = True
    cut = np.unique(labels[edge])
    cut = cut[cut != 0]
    return np.isin(labels, cut) if len(cut) else np.zeros(labels.shape, bool)


def polygon_vertices(points: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Vertices (n, 2, n_rays) of the polygons with centres ``points`` (n, 2) and ray lengths
    ``distances`` (n, n_rays), in float64."""
    angles = ray_angles(distances.shape[1])
    directions = np.stack([np.sin(angles), np.cos(angles)])  # (2, n_rays): dy, dx
    return (
        np.asarray(points, np.float64)[:, :, None]
        + np.asarray(distances, np.float64)[:, None, :] * directions[None]
    )


def suppression_order(points: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """The order in which suppression visits candidates: most probable first; equal
    probabilities by position (y, then x), so the order does not depend on the block."""
    keys = [points[:, axis] for axis in reversed(range(points.shape[1]))]
    return np.lexsort([*keys, -np.asarray(probabilities, np.float64)])


def suppress(
    points: np.ndarray, probabilities: np.ndarray, distances: np.ndarray, threshold: float
) -> np.ndarray:
    """Greedy non-maximum suppression of star-convex polygons; returns the indices of the kept
    candidates, most probable first.

    A candidate is dropped if it overlaps an already kept one by more than ``threshold``, the
    overlap being StarDist's: intersection area / the smaller of the two areas.
    """
    from stardist.nms import non_maximum_suppression_inds

    if len(points) == 0:
        return np.zeros(0, np.int64)
    order = suppression_order(points, probabilities)
    keep = non_maximum_suppression_inds(
        np.asarray(distances, np.float32)[order],
        np.asarray(points, np.float32)[order],
        scores=np.asarray(probabilities, np.float32)[order],
        thresh=threshold,
        use_bbox=True,
        use_kdtree=True,
        verbose=False,
    )
    return order[np.asarray(keep, bool)]


def bounding_boxes(points: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per polygon, the lowest and highest pixel coordinate it can cover (n, 2) each."""
    vertices = polygon_vertices(points, distances)
    return np.floor(vertices.min(axis=2)), np.ceil(vertices.max(axis=2))


def render_polygons(
    points: np.ndarray,
    distances: np.ndarray,
    probabilities: np.ndarray,
    ids: np.ndarray,
    region: Sequence[slice],
    dtype: np.dtype | type = np.uint32,
) -> np.ndarray:
    """Draw the polygons that overlap ``region`` (global slices) into a label image of the
    region's shape, less probable first (ties: lower ID first), so the more probable polygon
    wins where two overlap. A pixel is inside when its centre is (skimage.draw.polygon)."""
    shape = tuple(r.stop - r.start for r in region)
    labels = np.zeros(shape, dtype=dtype)
    if len(points) == 0:
        return labels
    origin = np.array([r.start for r in region], dtype=np.float64)
    low, high = bounding_boxes(points, distances)
    near = np.all((high >= origin) & (low < origin + np.array(shape)), axis=1)
    index = np.flatnonzero(near)
    order = index[np.lexsort([np.asarray(ids)[index], np.asarray(probabilities)[index]])]
    vertices = polygon_vertices(points[order], distances[order]) - origin[None, :, None]
    for label, (rows, cols) in zip(np.asarray(ids)[order], vertices, strict=True):
        rr, cc = draw_polygon(rows, cols, shape)
        labels[rr, cc] = label
    return labels


def polygons_to_labels(
    points: np.ndarray,
    distances: np.ndarray,
    probabilities: np.ndarray,
    shape: Sequence[int],
) -> np.ndarray:
    """Render polygons into a whole image with IDs 1..n in the given order."""
    ids = np.arange(1, len(points) + 1)
    region = tuple(slice(0, s) for s in shape)
    return render_polygons(points, distances, probabilities, ids, region)
