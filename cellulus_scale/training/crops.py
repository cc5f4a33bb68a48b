"""Random training crops read lazily from an OME-Zarr image, and the normalisation estimated
from them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from cellulus_scale.errors import UserInputError
from cellulus_scale.io.ome_zarr import OmeImage
from cellulus_scale.kernels.normalisation import Normalisation


def crop_shape(
    image: OmeImage, crop_size: int | tuple[int, ...], past: int | tuple[int, ...] = 0
) -> tuple[int, ...]:
    """Spatial crop shape: ``crop_size`` along y and x (and z for 3D images), or the given shape
    per spatial axis; refused where larger than the image, or than the image and ``past``
    pixels on each side (crops that may reach past the border, one number or one per axis)."""
    _, _, depth, height, width = image.canonical_shape
    spatial = (depth, height, width) if image.spatial_dims == 3 else (height, width)
    shape = (crop_size,) * len(spatial) if isinstance(crop_size, int) else tuple(crop_size)
    beyond = per_axis(past, len(spatial))
    if any(s + 2 * p < c for s, c, p in zip(spatial, shape, beyond, strict=True)):
        raise UserInputError(
            f"the image ({'x'.join(map(str, spatial))}) is smaller than the"
            f" {'x'.join(map(str, shape))} crops",
            "pass a smaller --crop-size that the network can take (see --help)",
        )
    return shape


def within_frame(image: OmeImage, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` cut to the image's spatial shape along each axis."""
    spatial = image.canonical_shape[-len(shape) :]
    return tuple(min(c, s) for c, s in zip(shape, spatial, strict=True))


def read_crop(
    image: OmeImage, frame: int, corner: tuple[int, ...], shape: tuple[int, ...]
) -> np.ndarray:
    """Read one (C, *spatial) crop; only the chunks it touches are loaded."""
    data = image.canonical()
    region = tuple(slice(c, c + s) for c, s in zip(corner, shape, strict=True))
    if len(shape) == 2:
        block = data[frame, :, 0][(slice(None), *region)]
    else:
        block = data[frame][(slice(None), *region)]
    return np.asarray(block.compute(scheduler="synchronous"))


def read_padded_crop(
    image: OmeImage,
    frame: int,
    corner: tuple[int, ...],
    shape: tuple[int, ...],
    mode: str = "reflect",
) -> np.ndarray:
    """Read one (C, *spatial) crop that may reach past the frame's border: ``'reflect'``ed
    there as prediction reflects an image
    (:func:`~cellulus_scale.kernels.noise.reflect_indices`), or ``'constant'`` 0 (background,
    for labels). Only the chunks the crop touches are read."""
    from cellulus_scale.kernels.noise import reflect_indices

    spatial = image.canonical_shape[-len(shape) :]
    if mode == "reflect":
        indices = [
            reflect_indices(c, c + s, size)
            for c, s, size in zip(corner, shape, spatial, strict=True)
        ]
        low = tuple(int(i.min()) for i in indices)
        block = read_crop(
            image,
            frame,
            low,
            tuple(int(i.max()) + 1 - a for i, a in zip(indices, low, strict=True)),
        )
        local = [i - a for i, a in zip(indices, low, strict=True)]
        return block[(slice(None), *np.ix_(*local))]
    inside = [
        (max(c, 0), min(c + s, size)) for c, s, size in zip(corner, shape, spatial, strict=True)
    ]
    block = read_crop(image, frame, tuple(a for a, _ in inside), tuple(b - a for a, b in inside))
    pads = [(0, 0)] + [
        (a - c, c + s - b) for (a, b), c, s in zip(inside, corner, shape, strict=True)
    ]
    return np.pad(block, pads) if any(before or after for before, after in pads) else block


def outside_frame(image: OmeImage, corner: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Mask of a crop's pixels (at ``corner``, of ``shape``) that lie past the frame's border."""
    spatial = image.canonical_shape[-len(shape) :]
    outside = np.zeros(shape, bool)
    for axis, (c, s, size) in enumerate(zip(corner, shape, spatial, strict=True)):
        positions = np.arange(c, c + s)
        along = (positions < 0) | (positions >= size)
        outside |= along.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return outside


def per_axis(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    """``value`` for each of ``dims`` axes: the same number on every axis, or one per axis."""
    return (int(value),) * dims if isinstance(value, int | np.integer) else tuple(value)


def random_corner(
    rng: np.random.Generator,
    image: OmeImage,
    shape: tuple[int, ...],
    reach: int | Sequence[int] = 0,
    spread: int | Sequence[int] = 0,
) -> tuple[int, tuple[int, ...]]:
    """A random frame and crop corner; the crop lies inside the frame, or reaches up to
    ``reach`` pixels past its border. With ``spread``, the corner is drawn from a range
    ``spread`` wider on each side and clipped: a crop at the border is ``spread + 1`` times as
    likely as one elsewhere, so that the pixels near the border are not seen less often. Both
    are one number, or one per axis."""
    frames, _, depth, height, width = image.canonical_shape
    spatial = (depth, height, width)[-len(shape) :]
    frame = int(rng.integers(frames))
    reaches, spreads = per_axis(reach, len(shape)), per_axis(spread, len(shape))
    corner = tuple(
        min(max(int(rng.integers(size - s + 1 + 2 * (r + w))) - r - w, -r), size - s + r)
        for size, s, r, w in zip(spatial, shape, reaches, spreads, strict=True)
    )
    return frame, corner


def textured_crop(
    rng: np.random.Generator,
    image: OmeImage,
    shape: tuple[int, ...],
    reach: int | Sequence[int] = 0,
    spread: int | Sequence[int] = 0,
) -> tuple[int, tuple[int, ...], np.ndarray]:
    """(frame, corner, crop) of a random crop that is not constant (up to 100 draws; the last
    one is taken when every draw is constant); ``reach`` and ``spread`` as in
    :func:`random_corner`, the part past the border reflected."""
    for _ in range(100):
        frame, corner = random_corner(rng, image, shape, reach, spread)
        raw = (
            read_padded_crop(image, frame, corner, shape)
            if any(per_axis(reach, len(shape)))
            else read_crop(image, frame, corner, shape)
        )
        if raw.size and raw.max() > raw.min():
            break
    return frame, corner, raw


def estimate_normalisation(
    image: OmeImage,
    crop_size: int | tuple[int, ...],
    samples: int,
    percentiles: tuple[float, float],
    seed: int,
) -> Normalisation:
    """Robust percentiles of the intensities over ``samples`` random crops (of ``crop_size``, at
    most the frame's side, or of the given shape, at most the frame's along each axis)."""
    if isinstance(crop_size, int):
        shape = crop_shape(image, min(crop_size, *image.canonical_shape[-2:]))
    else:
        shape = crop_shape(image, within_frame(image, crop_size))
    rng = np.random.default_rng([seed, 7])
    values = []
    for _ in range(samples):
        frame, corner = random_corner(rng, image, shape)
        values.append(read_crop(image, frame, corner, shape).ravel()[::7])
    pooled = np.concatenate(values).astype(np.float64)
    if not np.all(np.isfinite(pooled)):
        raise UserInputError(
            f"the image {image.path} contains NaN or Inf values",
            "replace them (e.g. with 0) before training",
        )
    low, high = np.percentile(pooled, percentiles)
    if high <= low:
        raise UserInputError(
            f"the image {image.path} has no contrast in its sampled crops (all values {low:g})",
            "check that the image is not empty or constant",
        )
    return Normalisation(float(low), float(high))


def augment(crop: np.ndarray, rng: np.random.Generator, elastic: bool) -> np.ndarray:
    """Random flips on every spatial axis, a random multiple of 90 degrees in yx, and optionally
    a smooth elastic deformation."""
    spatial_axes = list(range(1, crop.ndim))
    for axis in spatial_axes:
        if rng.random() < 0.5:
            crop = np.flip(crop, axis=axis)
    crop = np.rot90(crop, k=int(rng.integers(4)), axes=(crop.ndim - 2, crop.ndim - 1))
    if elastic:
        crop = elastic_deform(crop, rng)
    return np.ascontiguousarray(crop)


def elastic_deform(
    crop: np.ndarray, rng: np.random.Generator, sigma: float = 8.0, magnitude: float = 4.0
) -> np.ndarray:
    """Smooth random displacement field (Gaussian-filtered noise), linear interpolation."""
    shape = crop.shape[1:]
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    coords = []
    for axis_grid in grid:
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
        field *= magnitude / (np.abs(field).max() + 1e-6)
        coords.append(axis_grid + field)
    return np.stack(
        [ndimage.map_coordinates(channel, coords, order=1, mode="reflect") for channel in crop]
    )


class RandomCrops(torch.utils.data.Dataset):
    """Sample ``index`` is a random crop drawn from a generator seeded by (seed, index).

    Every crop is a function of the seed and its index alone, so training is reproducible
    whatever the number of loader workers, and resumable at any step.
    """

    def __init__(
        self,
        image: OmeImage,
        crop_size: int | tuple[int, ...],
        normalisation: Normalisation,
        seed: int,
        length: int,
        elastic: bool = False,
    ) -> None:
        self.image = image
        self.shape = crop_shape(image, crop_size)
        self.normalisation = normalisation
        self.seed = seed
        self.length = length
        self.elastic = elastic

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, int(index)])
        frame, corner, raw = textured_crop(rng, self.image, self.shape)
        crop = self.normalisation.apply(raw)
        return torch.from_numpy(augment(crop, rng, self.elastic))


def crops_per_epoch(
    image: OmeImage, crop_size: int | tuple[int, ...], floor: int, ceiling: int | None = None
) -> int:
    """An epoch: enough crops (of side ``crop_size``, or of that shape) to cover every pixel of
    the data once, at least ``floor`` and at most ``ceiling`` (where given)."""
    frames, _, depth, height, width = image.canonical_shape
    voxels = frames * height * width * (depth if image.spatial_dims == 3 else 1)
    if isinstance(crop_size, int):
        per_crop = crop_size**image.spatial_dims
    else:
        per_crop = math.prod(crop_size)
    crops = max(floor, math.ceil(voxels / per_crop))
    return crops if ceiling is None else min(crops, max(ceiling, floor))


def augment_with_labels(
    crop: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The same random flips and 90-degree rotation in yx for an image crop (C, *spatial) and
    its label crop (*spatial)."""
    for axis in range(1, crop.ndim):
        if rng.random() < 0.5:
            crop, labels = np.flip(crop, axis=axis), np.flip(labels, axis=axis - 1)
    turns = int(rng.integers(4))
    crop = np.rot90(crop, k=turns, axes=(crop.ndim - 2, crop.ndim - 1))
    labels = np.rot90(labels, k=turns, axes=(labels.ndim - 2, labels.ndim - 1))
    return np.ascontiguousarray(crop), np.ascontiguousarray(labels)


def check_labels_match(image: OmeImage, labels: OmeImage, name: str) -> None:
    """Refuse a label image whose frames or spatial shape differ from the image's."""
    frames, _, depth, height, width = image.canonical_shape
    l_frames, l_channels, l_depth, l_height, l_width = labels.canonical_shape
    if (frames, depth, height, width) != (l_frames, l_depth, l_height, l_width) or l_channels != 1:
        raise UserInputError(
            f"the labels '{name}' have shape {'x'.join(map(str, labels.data.shape))}"
            f" ({labels.axes}), but the image {image.path} has"
            f" {'x'.join(map(str, image.data.shape))} ({image.axes})",
            "use a label image of the same frames and size as the image",
        )
    if labels.data.dtype.kind not in "iub":
        raise UserInputError(
            f"the labels '{name}' are of type {labels.data.dtype}, not integers",
            "use an instance label image (integer IDs, 0 for background)",
        )


class LabelledCrops(torch.utils.data.Dataset):
    """Random crops of an image and of its instance labels at the same place, with StarDist
    targets for the network's output region (the crop less ``margin`` on every side).

    Sample ``index`` is a function of (seed, index) alone, as in :class:`RandomCrops`. Both
    crops are read lazily (only the chunks they touch). The output region reaches the frame's
    border, as prediction's blocks do, and about as often as it covers any other pixel: the
    crop's context past the border is reflected (as prediction reflects it) and its labels there
    are background, so an object cut by the frame's border is taught as cut. The targets are
    computed on the whole label crop: objects cut by the crop border are cut, and with
    ``ignore_cut_objects`` their pixels get weight 0. Objects the teacher is not to be trusted
    on (:func:`~cellulus_scale.kernels.star_convex.doubtful_objects`: size outside
    ``trusted_area`` pixels, solidity below ``trusted_solidity``; an object cut by the frame's
    border may be smaller) and a ring around them get weight 0 too: left out of the loss rather
    than taught as background. With ``grid`` g > 1 the targets are those of every g-th pixel of
    the output region (the network's output grid); in 3D the rays follow ``anisotropy``
    (:func:`~cellulus_scale.kernels.star_convex.sphere_rays`). Returns (image (C, *crop),
    probability (*out), distances (n_rays, *out), weight (*out)).
    """

    def __init__(
        self,
        image: OmeImage,
        labels: OmeImage,
        crop_size: int | tuple[int, ...],
        margin: int | tuple[int, ...],
        normalisation: Normalisation,
        seed: int,
        length: int,
        n_rays: int,
        ignore_cut_objects: bool = True,
        trusted_area: tuple[float, float] | None = None,
        trusted_solidity: float | None = None,
        grid: int = 1,
        anisotropy: tuple[float, float, float] | None = None,
    ) -> None:
        self.image = image
        self.labels = labels
        self.margins = per_axis(margin, image.spatial_dims)
        # the output region stays in the frame: the crop may exceed it by the margins
        self.shape = crop_shape(image, crop_size, self.margins)
        self.normalisation = normalisation
        self.seed = seed
        self.length = length
        self.n_rays = n_rays
        self.ignore_cut_objects = ignore_cut_objects
        self.trusted_area = trusted_area
        self.trusted_solidity = trusted_solidity
        self.grid = grid
        self.anisotropy = anisotropy

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        from cellulus_scale.kernels.star_convex import (
            doubtful_objects,
            object_probability,
            star_distances,
            touching_border,
        )

        rng = np.random.default_rng([self.seed, int(index)])
        margins = self.margins
        spread = [(s - 2 * m) // 2 for s, m in zip(self.shape, margins, strict=True)]  # half out
        frame, corner, raw = textured_crop(rng, self.image, self.shape, margins, spread)
        labels = read_padded_crop(self.labels, frame, corner, self.shape, "constant")[0]
        labels = labels.astype(np.int64)
        labels[outside_frame(self.labels, corner, self.shape)] = -1  # flipped with the labels
        crop, labels = augment_with_labels(self.normalisation.apply(raw), labels, rng)
        outside = labels < 0
        labels[outside] = 0
        g = self.grid
        inner = tuple(slice(m, s - m, g) for s, m in zip(labels.shape, margins, strict=True))
        doubtful = doubtful_objects(labels, self.trusted_area, self.trusted_solidity, cut=outside)
        labels = np.where(doubtful, 0, labels)
        probability = object_probability(labels)[inner]
        on_grid = tuple(
            slice(m // g, (s - m) // g) for s, m in zip(labels.shape, margins, strict=True)
        )
        distances = star_distances(labels, self.n_rays, g, self.anisotropy)[(slice(None), *on_grid)]
        weight = np.ones(probability.shape, np.float32)
        if self.ignore_cut_objects:
            weight[touching_border(labels)[inner]] = 0.0
        weight[doubtful[inner]] = 0.0
        return (
            torch.from_numpy(crop),
            torch.from_numpy(np.ascontiguousarray(probability)),
            torch.from_numpy(np.ascontiguousarray(distances)),
            torch.from_numpy(weight),
        )


def median_object_size(
    labels: OmeImage, shape: tuple[int, ...], seed: int, crops: int = 16
) -> float:
    """Median size (pixels; voxels in 3D) of the objects inside ``crops`` random crops of the
    label image (of ``shape``, at most the image's; objects cut by a crop's border left out); 0
    when there are none."""
    shape = within_frame(labels, shape)
    rng = np.random.default_rng([seed, 7])
    sizes: list[np.ndarray] = []
    for _ in range(crops):
        frame, corner = random_corner(rng, labels, shape)
        crop = read_crop(labels, frame, corner, shape)[0]
        ids, counts = np.unique(crop, return_counts=True)
        edge = np.unique(
            np.concatenate([np.moveaxis(crop, a, 0)[[0, -1]].ravel() for a in range(crop.ndim)])
        )
        keep = (ids != 0) & ~np.isin(ids, edge)
        sizes.append(counts[keep])
    every = np.concatenate(sizes)
    return float(np.median(every)) if every.size else 0.0
