"""Star-convex polygon geometry for the supervised (StarDist) model: pure numpy kernels.

The radial distances, the polygon overlap used by non-maximum suppression and the object
probability come from the ``stardist`` package (its C++ kernels, used without TensorFlow:
only ``stardist.geometry``, ``stardist.nms`` and ``stardist.utils``); this module fixes the
conventions around them that blockwise prediction needs:

- rays: in 2D, angle ``2 pi k / n`` with ``dy = sin``, ``dx = cos`` (StarDist's convention);
  in 3D, StarDist's golden spiral on the unit sphere (``Rays_GoldenSpiral(n, anisotropy)``),
  directions (dz, dy, dx) in voxels; with an ``anisotropy`` (the voxel size over its smallest
  side, e.g. (3, 1, 1) for planes 3 px apart) the rays are spread evenly in physical space, as
  StarDist does for anisotropic stacks, so a flat-in-voxels nucleus gets as many rays across
  its height as across its width;
- suppression visits candidates in a deterministic order (probability, then global position),
  so that two blocks that see the same candidates keep the same ones (in 3D the overlap is
  StarDist's polyhedron overlap);
- rendering draws polygons in a deterministic order (probability ascending, then ID: the
  more probable polygon is drawn last and wins where two overlap) with global IDs, at global
  coordinates, so every block draws the same pixels.

2D objects are polygons, 3D objects polyhedra (rendered with StarDist's
``polyhedron_to_label``, one polyhedron at a time, so the drawing order stays ours).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from skimage.draw import polygon as draw_polygon

#: Default number of rays: 32 on a circle in 2D, 96 on a sphere in 3D.
DEFAULT_RAYS = {2: 32, 3: 96}
#: The fewest rays a 3D golden spiral needs to span a polyhedron.
MIN_RAYS = {2: 3, 3: 6}


def ray_angles(n_rays: int) -> np.ndarray:
    """Angles of the 2D rays: 2 pi k / n_rays."""
    return np.arange(n_rays) * (2 * np.pi / n_rays)


#: The rays' anisotropy in 3D: (z, y, x) voxel size over its smallest side; None: isotropic.
Anisotropy = tuple[float, float, float] | None


def as_anisotropy(values: Sequence[float]) -> Anisotropy:
    """The anisotropy written as a sequence: three values, or none for isotropic rays."""
    if len(values) == 0:
        return None
    z, y, x = (float(v) for v in values)
    return (z, y, x)


@lru_cache(maxsize=8)
def sphere_rays(n_rays: int, anisotropy: Anisotropy = None) -> Any:
    """StarDist's 3D rays: ``n_rays`` golden-spiral directions, with the triangular faces
    between them; even on the unit sphere in voxels (``anisotropy`` None) or in physical space
    (each direction's components divided by ``anisotropy``, then normalised in voxels)."""
    from stardist import Rays_GoldenSpiral

    return Rays_GoldenSpiral(n_rays, anisotropy=anisotropy)


def ray_directions(n_rays: int, dims: int, anisotropy: Anisotropy = None) -> np.ndarray:
    """Unit directions (dims, n_rays) of the rays in voxels: (dy, dx) in 2D, (dz, dy, dx) in
    3D (spread evenly in physical space with an ``anisotropy``)."""
    if dims == 2:
        angles = ray_angles(n_rays)
        return np.stack([np.sin(angles), np.cos(angles)])
    if dims == 3:
        return np.asarray(sphere_rays(n_rays, anisotropy).vertices, np.float64).T
    raise ValueError(f"star-convex objects are 2D or 3D, not {dims}D")


def _sequential(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n (0 stays background): StarDist's kernel reads uint16."""
    values, inverse = np.unique(labels, return_inverse=True)
    if values[0] != 0:
        inverse = inverse + 1
    if inverse.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError("more than 65535 objects in one crop")
    return inverse.reshape(labels.shape).astype(np.uint16)


def star_distances(
    labels: np.ndarray, n_rays: int | None = None, grid: int = 1, anisotropy: Anisotropy = None
) -> np.ndarray:
    """Radial distances (n_rays, *shape), float32: for every object pixel (voxel in 3D), the
    distance along each ray to the last pixel of the same object (outside the array counts as
    background); zero on background. Computed on ``labels`` as given, so objects cut by its
    border are cut. ``n_rays`` defaults to 32 in 2D and 96 in 3D. ``grid`` g: only every g-th
    pixel along each axis (shape ceil(shape / g)), distances still in pixels. 3D: the rays of
    :func:`sphere_rays` for ``anisotropy``."""
    from stardist.geometry import star_dist, star_dist3D

    if labels.ndim not in (2, 3):
        raise ValueError(f"star_distances takes a 2D or 3D label image, got {labels.ndim}D")
    n_rays = DEFAULT_RAYS[labels.ndim] if n_rays is None else n_rays
    if labels.ndim == 2:
        distances = star_dist(_sequential(labels), n_rays, grid=(grid,) * 2)
    else:
        distances = star_dist3D(
            _sequential(labels), sphere_rays(n_rays, anisotropy), grid=(grid,) * 3
        )
    return np.ascontiguousarray(np.moveaxis(distances, -1, 0), dtype=np.float32)


def object_probability(labels: np.ndarray) -> np.ndarray:
    """StarDist's object probability: each object's Euclidean distance transform divided by its
    maximum (1 at the object's innermost pixel, small at its border, 0 on background)."""
    from stardist.utils import edt_prob

    if not np.any(labels):
        return np.zeros(labels.shape, np.float32)
    return np.asarray(edt_prob(_sequential(labels)), dtype=np.float32)


def doubtful_objects(
    labels: np.ndarray,
    area_range: tuple[float, float] | None,
    min_solidity: float | None,
    margin: int = 2,
    cut: np.ndarray | None = None,
) -> np.ndarray:
    """Mask of the pixels a teacher's labels are not to be trusted on: every object whose size
    (pixels; voxels in 3D) lies outside ``area_range`` or whose solidity (its share of its
    convex hull: low for two touching nuclei taken as one) is below ``min_solidity``, grown by
    ``margin`` pixels. ``None`` leaves out that test. Objects next to the ``cut`` mask (the
    part of a crop past the frame's border) are cut by it, so may be smaller than the range."""
    from scipy import ndimage
    from skimage.measure import regionprops

    if area_range is None and min_solidity is None:
        return np.zeros(labels.shape, bool)

    cut_ids: set[int] = set()
    if cut is not None and cut.any():
        cut_ids = set(np.unique(labels[ndimage.binary_dilation(cut)]).tolist()) - {0}

    def doubtful(region: Any) -> bool:
        if area_range is not None and region.area > area_range[1]:
            return True
        if area_range is not None and region.area < area_range[0] and region.label not in cut_ids:
            return True
        if min_solidity is None or region.area < 3**labels.ndim:  # too small for a hull
            return False
        return bool(region.solidity < min_solidity)

    bad = [region.label for region in regionprops(labels) if doubtful(region)]
    mask = np.isin(labels, bad) if bad else np.zeros(labels.shape, bool)
    if bad and margin:
        mask = ndimage.binary_dilation(mask, iterations=margin)
    return mask


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


def polygon_vertices(
    points: np.ndarray, distances: np.ndarray, anisotropy: Anisotropy = None
) -> np.ndarray:
    """Vertices (n, dims, n_rays) of the polygons (polyhedra in 3D) with centres ``points``
    (n, dims) and ray lengths ``distances`` (n, n_rays), in float64."""
    points = np.asarray(points)
    directions = ray_directions(distances.shape[1], points.shape[1], anisotropy)
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
    points: np.ndarray,
    probabilities: np.ndarray,
    distances: np.ndarray,
    threshold: float,
    anisotropy: Anisotropy = None,
) -> np.ndarray:
    """Greedy non-maximum suppression of star-convex polygons (polyhedra for 3D ``points``);
    returns the indices of the kept candidates, most probable first.

    A candidate is dropped if it overlaps an already kept one by more than ``threshold``, the
    overlap being StarDist's: intersection area (volume) / the smaller of the two.
    """
    from stardist.nms import non_maximum_suppression_3d_inds, non_maximum_suppression_inds

    if len(points) == 0:
        return np.zeros(0, np.int64)
    order = suppression_order(points, probabilities)
    if np.asarray(points).shape[1] == 3:
        # StarDist's 3D wrapper re-sorts by score (unstably); distinct descending scores in our
        # order make it keep our order, ties included
        keep = non_maximum_suppression_3d_inds(
            np.asarray(distances, np.float32)[order],
            np.asarray(points, np.float32)[order],
            sphere_rays(np.asarray(distances).shape[1], anisotropy),
            scores=np.arange(len(order), 0, -1, dtype=np.float64),
            thresh=threshold,
            use_bbox=True,
            use_kdtree=True,
            verbose=False,
        )
        return order[np.asarray(keep, bool)]
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


def bounding_boxes(
    points: np.ndarray, distances: np.ndarray, anisotropy: Anisotropy = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per polygon, the lowest and highest pixel coordinate it can cover (n, dims) each."""
    vertices = polygon_vertices(points, distances, anisotropy)
    return np.floor(vertices.min(axis=2)), np.ceil(vertices.max(axis=2))


def render_polygons(
    points: np.ndarray,
    distances: np.ndarray,
    probabilities: np.ndarray,
    ids: np.ndarray,
    region: Sequence[slice],
    dtype: np.dtype | type = np.uint32,
    anisotropy: Anisotropy = None,
) -> np.ndarray:
    """Draw the polygons (polyhedra in 3D) that overlap ``region`` (global slices) into a label
    image of the region's shape, less probable first (ties: lower ID first), so the more
    probable polygon wins where two overlap. A pixel is inside when its centre is
    (skimage.draw.polygon in 2D; StarDist's polyhedron_to_label in 3D, evaluated per
    polyhedron on its bounding box, which depends only on the pixel's position relative to
    the (integer) centre)."""
    shape = tuple(r.stop - r.start for r in region)
    labels = np.zeros(shape, dtype=dtype)
    if len(points) == 0:
        return labels
    origin = np.array([r.start for r in region], dtype=np.float64)
    low, high = bounding_boxes(points, distances, anisotropy)
    near = np.all((high >= origin) & (low < origin + np.array(shape)), axis=1)
    index = np.flatnonzero(near)
    order = index[np.lexsort([np.asarray(ids)[index], np.asarray(probabilities)[index]])]
    if len(shape) == 3:
        rays = sphere_rays(distances.shape[1], anisotropy)
        _render_polyhedra(labels, points, distances, ids, order, origin, low, high, rays)
        return labels
    vertices = polygon_vertices(points[order], distances[order]) - origin[None, :, None]
    for label, (rows, cols) in zip(np.asarray(ids)[order], vertices, strict=True):
        rr, cc = draw_polygon(rows, cols, shape)
        labels[rr, cc] = label
    return labels


def _render_polyhedra(
    labels: np.ndarray,
    points: np.ndarray,
    distances: np.ndarray,
    ids: np.ndarray,
    order: np.ndarray,
    origin: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    rays: Any,
) -> None:
    """Draw the polyhedra ``order`` into ``labels`` (region starting at ``origin``), in order:
    each is rendered alone on its whole bounding box (StarDist's kernel never returns for some
    polyhedra whose centre lies outside the box it draws in), then its part in the region is
    pasted."""
    from stardist.geometry import polyhedron_to_label

    shape = np.array(labels.shape)
    ids = np.asarray(ids)
    for k in order:
        first = np.maximum(low[k] - origin, 0).astype(np.int64)
        last = np.minimum(high[k] - origin + 1, shape).astype(np.int64)
        if np.any(last <= first):
            continue
        corner = low[k] - origin  # the whole box, in the region's coordinates
        mask = polyhedron_to_label(
            np.maximum(np.asarray(distances[k], np.float32), 1e-3)[None],
            (np.asarray(points[k], np.float64) - origin - corner)[None],
            rays,
            tuple(int(s) for s in high[k] - low[k] + 1),
            verbose=False,
        )
        inside = tuple(
            slice(int(a - c), int(b - c)) for a, b, c in zip(first, last, corner, strict=True)
        )
        box = tuple(slice(int(a), int(b)) for a, b in zip(first, last, strict=True))
        labels[box][mask[inside] > 0] = ids[k]


def polygons_to_labels(
    points: np.ndarray,
    distances: np.ndarray,
    probabilities: np.ndarray,
    shape: Sequence[int],
    anisotropy: Anisotropy = None,
) -> np.ndarray:
    """Render polygons into a whole image with IDs 1..n in the given order."""
    ids = np.arange(1, len(points) + 1)
    region = tuple(slice(0, s) for s in shape)
    return render_polygons(points, distances, probabilities, ids, region, anisotropy=anisotropy)
