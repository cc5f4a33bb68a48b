"""Pure clustering and post-processing kernels for one block (numpy in, numpy out)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.filters import threshold_li, threshold_otsu
from sklearn.cluster import MeanShift

from cellulus_scale.kernels.noise import position_uniform

FIT_SAMPLE_PASS = -1  # the noise stream used to pick the mean-shift fit sample


def embeddings_of(
    offsets: np.ndarray,
    origin: Sequence[int],
    mean_offset: np.ndarray,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Centred embeddings e(i) = r(i) - mean offset + i, as (dims, *spatial), in global pixels;
    with ``spacing`` (voxel size per axis) the position i is physical (index x spacing)."""
    grids = np.indices(offsets.shape[1:], dtype=np.float64)
    for axis, start in enumerate(origin):
        grids[axis] += start
        if spacing is not None:
            grids[axis] *= float(spacing[axis])
    return (
        offsets.astype(np.float64)
        - np.asarray(mean_offset, dtype=np.float64).reshape((-1,) + (1,) * (offsets.ndim - 1))
        + grids
    )


def fit_sample_mask(
    shape: Sequence[int], origin: Sequence[int], frame: int, seed: int, fraction: float
) -> np.ndarray:
    """A block-independent random subset of pixels (a function of global position)."""
    grids = [
        (np.arange(size, dtype=np.int64) + start).reshape(
            [-1 if a == axis else 1 for a in range(len(shape))]
        )
        for axis, (size, start) in enumerate(zip(shape, origin, strict=True))
    ]
    return position_uniform(seed, frame, FIT_SAMPLE_PASS & 0xFFFF, grids) < fraction


def find_centres(
    embeddings: np.ndarray,
    foreground: np.ndarray,
    sample: np.ndarray,
    bandwidth: float,
    method: str = "meanshift",
) -> np.ndarray:
    """Cluster centres (modes) of the foreground embeddings, as an (n, dims) array.

    ``sklearn``: scikit-learn's MeanShift (bin seeding) fitted on the sampled pixels, the
    reference. ``meanshift``: the same flat-kernel mean-shift from the same seeds, run as
    vectorised numpy iterations over a KD-tree (see :func:`fast_mean_shift`).
    """
    points = embeddings[:, foreground & sample].T
    if len(points) == 0:
        return np.zeros((0, embeddings.shape[0]))
    if method == "sklearn":
        model = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=True)
        try:
            model.fit(points)
        except ValueError:  # no seed bin has enough points
            return np.zeros((0, embeddings.shape[0]))
        return model.cluster_centers_
    return fast_mean_shift(points, bandwidth)


def bin_seeds(points: np.ndarray, bin_size: float, min_bin_freq: int = 1) -> np.ndarray:
    """Seeds on a grid of ``bin_size`` in global coordinates (as scikit-learn's bin seeding)."""
    binned = np.round(points / bin_size).astype(np.int64)
    unique, counts = np.unique(binned, axis=0, return_counts=True)
    return unique[counts >= min_bin_freq].astype(np.float64) * bin_size


def fast_mean_shift(
    points: np.ndarray, bandwidth: float, max_iter: int = 300, tol: float = 1e-3
) -> np.ndarray:
    """Flat-kernel mean-shift from bin seeds, all seeds iterated together.

    Follows scikit-learn's algorithm (bin seeding, convergence at 1e-3 x bandwidth, modes
    within one bandwidth of a more populated one removed) so it finds the same modes, but
    moves every seed at once with one KD-tree query per iteration.
    """
    dims = points.shape[1]
    tree = cKDTree(points)
    seeds = bin_seeds(points, bandwidth)
    active = np.ones(len(seeds), dtype=bool)
    counts = np.zeros(len(seeds), dtype=np.int64)
    stop = tol * bandwidth
    for _ in range(max_iter):
        index = np.flatnonzero(active)
        if len(index) == 0:
            break
        neighbours = tree.query_ball_point(seeds[index], r=bandwidth, return_sorted=True)
        sizes = np.array([len(n) for n in neighbours], dtype=np.int64)
        empty = sizes == 0
        flat = np.concatenate(neighbours).astype(np.int64) if sizes.sum() else np.zeros(0, int)
        owner = np.repeat(np.arange(len(index)), sizes)
        sums = np.stack(
            [
                np.bincount(owner, weights=points[flat, d], minlength=len(index))
                for d in range(dims)
            ],
            axis=1,
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / sizes[:, None]
        means[empty] = seeds[index][empty]
        moved = np.linalg.norm(means - seeds[index], axis=1)
        seeds[index] = means
        counts[index] = sizes
        converged = (moved <= stop) | empty
        active[index[converged]] = False
    keep = counts > 0
    seeds, counts = seeds[keep], counts[keep]
    order = np.lexsort((*seeds.T[::-1], -counts))  # most populated first, ties by position
    seeds = seeds[order]
    unique = np.ones(len(seeds), dtype=bool)
    if len(seeds):
        close_to = cKDTree(seeds).query_ball_point(seeds, r=bandwidth)
        for i, close in enumerate(close_to):
            if unique[i]:
                unique[close] = False
                unique[i] = True
    return seeds[unique]


def assign_to_centres(
    embeddings: np.ndarray,
    foreground: np.ndarray,
    centres: np.ndarray,
    ids: np.ndarray,
    max_distance: float,
    dtype: np.dtype = np.uint32,
) -> np.ndarray:
    """Label each foreground pixel with the ID of its nearest centre (0 if none within
    ``max_distance``)."""
    labels = np.zeros(foreground.shape, dtype=dtype)
    if len(centres) == 0 or not foreground.any():
        return labels
    points = embeddings[:, foreground].T
    # the bound prunes the search; points with no centre within it get distance inf
    bound = np.nextafter(max_distance, np.inf)
    distance, nearest = cKDTree(centres).query(points, k=1, distance_upper_bound=bound)
    within = distance <= max_distance
    values = np.zeros(len(points), dtype=dtype)
    values[within] = ids[nearest[within]]
    labels[foreground] = values
    return labels


def postprocess_cell(
    labels: np.ndarray, grow: float, shrink: float, sampling: Sequence[float] | None = None
) -> np.ndarray:
    """'cell' mode: grow the foreground by ``grow`` px, then erode that mask by ``shrink`` px
    (distances in physical units with ``sampling``, the voxel size per axis)."""
    expanded = ndimage.distance_transform_edt(labels == 0, sampling=sampling) < grow
    inside = ndimage.distance_transform_edt(expanded, sampling=sampling)
    result = labels.copy()
    result[inside < shrink] = 0
    return result


def postprocess_nucleus(
    labels: np.ndarray, intensity: np.ndarray, threshold: str = "otsu"
) -> np.ndarray:
    """'nucleus' mode: inside each instance keep pixels above its intensity threshold
    (``threshold``: 'otsu', 'log-otsu' or 'li', see :func:`object_threshold`), then fill
    holes."""
    result = np.zeros_like(labels)
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        mask = labels[region] == index
        values = intensity[region][mask]
        if values.size < 2 or values.min() == values.max():
            kept = mask
        else:
            kept = fill_holes(mask & (intensity[region] > object_threshold(values, threshold)))
            kept &= mask | fill_holes(mask)
        result[region][kept] = index
    return result


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a mask; in 3D also those of each plane, which a stack's first or last
    plane leaves open in 3D (a nucleolus of a nucleus that the stack cuts, say)."""
    filled = ndimage.binary_fill_holes(mask)
    if mask.ndim == 3:
        for plane in filled:
            plane[...] = ndimage.binary_fill_holes(plane)
    return filled


def object_threshold(values: np.ndarray, method: str) -> float:
    """The intensity threshold of one object's ``values``: Otsu's ('otsu'), Otsu's of their
    logarithm shifted to start at 1 ('log-otsu'), or Li's minimum cross-entropy ('li')."""
    if method == "otsu":
        return float(threshold_otsu(values))
    if method == "li":
        return float(threshold_li(values))
    if method != "log-otsu":
        raise ValueError(f"unknown nucleus threshold {method!r}")
    low = float(values.min())
    return float(np.expm1(threshold_otsu(np.log1p(values - low)))) + low


def relabel_sequential_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary IDs to 1..n (for the per-region kernels), returning the inverse map."""
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        ids = np.concatenate([[0], ids])
        inverse = inverse + 1
    return inverse.reshape(labels.shape).astype(np.int64), ids


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Keep, of every object, its largest connected part (a nucleus is one piece; the rest are
    stray pixels that point at its centre). Labels must be 1..n (see
    :func:`relabel_sequential_ids`)."""
    result = np.zeros_like(labels)
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        mask = labels[region] == index
        parts, count = ndimage.label(mask)
        if count > 1:
            sizes = np.bincount(parts.ravel())
            sizes[0] = 0
            mask = parts == sizes.argmax()
        result[region][mask] = index
    return result


def object_contrast(
    labels: np.ndarray,
    intensity: np.ndarray,
    ring: int,
    count: int | None = None,
    sampling: Sequence[float] | None = None,
) -> np.ndarray:
    """How far each object stands out from its surroundings: (mean intensity inside - mean of the
    ring of ``ring`` pixels around it that no object covers) / the ring's std, for labels 1..n
    (``count`` of them, default the largest label). An object without such a ring (surrounded
    by objects) or not present gets +inf. With ``sampling`` (the voxel size per axis) the ring
    is ``ring`` in-plane pixels wide in physical distance (fewer planes in z)."""
    contrast = np.full(int(labels.max()) if count is None else count, np.inf)
    covered = labels > 0
    structure = ndimage.generate_binary_structure(labels.ndim, 1)
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        grown = tuple(
            slice(max(0, r.start - ring - 1), min(size, r.stop + ring + 1))
            for r, size in zip(region, labels.shape, strict=True)
        )
        mask = labels[grown] == index
        if sampling is None:
            around = ndimage.binary_dilation(mask, structure, iterations=ring) & ~covered[grown]
        else:
            near = ndimage.distance_transform_edt(~mask, sampling=sampling) <= ring
            around = near & ~covered[grown]
        if around.sum() < 2:
            continue
        outside = intensity[grown][around]
        spread = float(outside.std())
        difference = float(intensity[grown][mask].mean() - outside.mean())
        contrast[index - 1] = difference / spread if spread > 0 else np.sign(difference) * np.inf
    return contrast


def postprocess(
    labels: np.ndarray,
    intensity: np.ndarray | None,
    mode: str,
    grow: float,
    shrink: float,
    min_size: float,
    ring: int = 0,
    min_contrast: float | None = None,
    sampling: Sequence[float] | None = None,
    nucleus_threshold: str = "otsu",
) -> np.ndarray:
    """Post-process instance labels of a region (any IDs): shape by ``mode``, then keep each
    object's largest connected part, drop objects under ``min_size`` (voxels) and, with
    ``min_contrast``, objects whose mean intensity stands less than ``min_contrast`` standard
    deviations above their surroundings (:func:`object_contrast` with ``ring``). ``sampling``:
    the voxel size per axis, so that distances are physical (None: isotropic);
    ``nucleus_threshold``: 'nucleus' mode's threshold in each object (:func:`object_threshold`)."""
    compact, ids = relabel_sequential_ids(labels)
    if mode == "cell":
        compact = postprocess_cell(compact, grow, shrink, sampling)
    elif mode == "nucleus":
        if intensity is None:
            raise ValueError("nucleus mode needs the intensity image")
        compact = postprocess_nucleus(compact, intensity, nucleus_threshold)
    if mode != "none":
        compact = keep_largest_components(compact)
    sizes = np.bincount(compact.ravel(), minlength=len(ids))
    small = sizes < min_size
    small[0] = False
    compact[small[compact]] = 0
    if min_contrast is not None and len(ids) > 1:
        if intensity is None:
            raise ValueError("the contrast rule needs the intensity image")
        faint = np.concatenate(
            [
                [False],
                object_contrast(compact, intensity, ring, len(ids) - 1, sampling) < min_contrast,
            ]
        )
        compact[faint[compact]] = 0
    return ids[compact].astype(labels.dtype)
