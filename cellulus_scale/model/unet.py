"""The mini U-Net with valid convolutions, and its size arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cellulus_scale.config import ModelConfig
from cellulus_scale.errors import UserInputError

# Per-side pixels lost by one [3x3, 1x1, 1x1, 3x3] block of valid convolutions.
_BLOCK_LOSS = 2


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _conv_block(
    dims: int, in_channels: int, out_channels: int, flat: bool = False
) -> nn.Sequential:
    """[3x3, 1x1, 1x1, 3x3] convolutions with ReLU; ``flat`` (3D): 1x3x3 instead of 3x3x3."""
    conv = _conv(dims)
    layers: list[nn.Module] = []
    channels = in_channels
    for size in (3, 1, 1, 3):
        kernel: int | tuple[int, ...] = (1, size, size) if flat and size > 1 else size
        layers += [conv(channels, out_channels, kernel), nn.ReLU(inplace=True)]
        channels = out_channels
    return nn.Sequential(*layers)


def _factor(dims: int, flat: bool) -> int | tuple[int, ...]:
    """The pooling (and upsampling) factor of a level: 2, or (1, 2, 2) where it is flat."""
    return (1, 2, 2) if flat else 2


def _center_crop(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    slices = [slice(None), slice(None)]
    for size, target in zip(tensor.shape[2:], shape, strict=True):
        start = (size - target) // 2
        slices.append(slice(start, start + target))
    return tensor[tuple(slices)]


class UNet(nn.Module):
    """U-Net of valid convolutions: max-pool 2x down, nearest 2x up, cropped skips, 1x1 head.

    With ``config.grid`` g > 1 (2D) the input's g x g cells become channels first
    (space-to-depth), so the output has one value per g-th pixel along each axis.

    In 3D the first ``config.flat_levels`` levels (anisotropic voxels) pool (1, 2, 2) and
    convolve 1x3x3; the rest is isotropic."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {config.spatial_dims}")
        self.config = config
        dims = config.spatial_dims
        if config.grid < 1 or (config.grid > 1 and dims != 2):
            raise ValueError(f"grid must be 1, or more for a 2D model, got {config.grid}")
        flat = [level < config.flat_levels for level in range(config.depth + 1)]
        self.flat = flat
        widths = [
            config.feature_maps * config.feature_factor**level for level in range(config.depth + 1)
        ]
        self.down = nn.ModuleList()
        channels = config.in_channels * config.grid**dims  # space-to-depth of the grid cells
        for level in range(config.depth):
            self.down.append(_conv_block(dims, channels, widths[level], flat[level]))
            channels = widths[level]
        self.bottom = _conv_block(dims, channels, widths[config.depth], flat[config.depth])
        self.up = nn.ModuleList()
        channels = widths[config.depth]
        for level in reversed(range(config.depth)):
            self.up.append(_conv_block(dims, channels + widths[level], widths[level], flat[level]))
            channels = widths[level]
        conv = _conv(dims)
        self.head = nn.Sequential(
            conv(channels, channels, 1), nn.ReLU(inplace=True), conv(channels, config.outputs, 1)
        )
        self.pools = nn.ModuleList(
            nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(_factor(dims, flat[level]))
            for level in range(config.depth)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.grid > 1:
            x = nn.functional.pixel_unshuffle(x, self.config.grid)
        skips = []
        for block, pool in zip(self.down, self.pools, strict=True):
            x = block(x)
            skips.append(x)
            x = pool(x)
        x = self.bottom(x)
        levels = reversed(range(len(self.up)))
        for block, skip, level in zip(self.up, reversed(skips), levels, strict=True):
            factor = _factor(x.dim() - 2, self.flat[level])
            x = nn.functional.interpolate(x, scale_factor=factor, mode="nearest")
            x = torch.cat([_center_crop(skip, x.shape[2:]), x], dim=1)
            x = block(x)
        return self.head(x)


def output_size(input_size: int, depth: int, flat_levels: int = 0, grid: int = 1) -> int | None:
    """Output length of the valid U-Net along one axis, or None if the input cannot be taken.

    ``flat_levels``: the first levels neither convolve nor pool along this axis (the z axis of
    an anisotropic 3D network, whose first levels are 1x3x3 with (1, 2, 2) pooling; ``depth +
    1``: every level, the bottom included). ``grid``:
    the input is taken in cells of ``grid`` pixels (a multiple of it) and the output counts
    cells, one per ``grid`` pixels."""
    if input_size % grid:
        return None
    size = input_size // grid
    for level in range(depth):
        if level < flat_levels:
            continue
        size -= 2 * _BLOCK_LOSS
        if size < 2 or size % 2:
            return None
        size //= 2
    if flat_levels <= depth:  # the bottom level convolves this axis unless it is flat too
        size -= 2 * _BLOCK_LOSS
    if size < 1:
        return None
    for level in reversed(range(depth)):
        if level < flat_levels:
            continue
        size = size * 2 - 2 * _BLOCK_LOSS
        if size < 1:
            return None
    return size


def context(depth: int, flat_levels: int = 0, grid: int = 1) -> int:
    """Pixels lost per side along one axis (the halo a block needs), computed from the
    architecture (``flat_levels`` and ``grid`` as in :func:`output_size`)."""
    size = smallest_valid_size_at_least(1, depth, flat_levels, grid)
    out = output_size(size, depth, flat_levels, grid)
    assert out is not None
    return (size - out * grid) // 2


def pooling_step(depth: int, flat_levels: int = 0, grid: int = 1) -> int:
    """The pixels between two positions on which the network reads the same way along one
    axis: its input must start on this grid for outputs not to depend on where it starts."""
    return grid * 2 ** max(0, depth - flat_levels)


def axis_flat_levels(config: ModelConfig) -> tuple[int, ...]:
    """Per spatial axis, the levels that leave it alone: the z axis of an anisotropic 3D model
    skips its flat levels, every other axis none."""
    flat = config.flat_levels
    return tuple(
        flat if axis == 0 and config.spatial_dims == 3 else 0 for axis in range(config.spatial_dims)
    )


def contexts(config: ModelConfig) -> tuple[int, ...]:
    """The context (halo) per spatial axis of the model ``config`` describes."""
    return tuple(context(config.depth, flat, config.grid) for flat in axis_flat_levels(config))


def largest_valid_size_at_most(
    size: int, depth: int, flat_levels: int = 0, grid: int = 1
) -> int | None:
    """The largest input size <= ``size`` that the network can take (None if there is none)."""
    return next(
        (s for s in range(size, 0, -1) if output_size(s, depth, flat_levels, grid) is not None),
        None,
    )


def valid_sizes_near(size: int, depth: int, flat_levels: int = 0, grid: int = 1) -> list[int]:
    """The valid input sizes nearest to ``size``: the largest below and the smallest above."""
    largest = largest_valid_size_at_most(size, depth, flat_levels, grid)
    below = [] if largest is None else [largest]
    above = [
        s
        for s in range(size, size + 64 * grid * 2**depth)
        if output_size(s, depth, flat_levels, grid) is not None
    ][:1]
    return sorted(set(below + above))


def smallest_valid_size_at_least(size: int, depth: int, flat_levels: int = 0, grid: int = 1) -> int:
    """The smallest input size >= ``size`` that the network can take (along an axis with
    ``flat_levels``)."""
    while output_size(size, depth, flat_levels, grid) is None:
        size += 1
    return size


def check_input_size(size: int, depth: int, what: str = "crop size", grid: int = 1) -> None:
    """Refuse (UserInputError) a ``size`` the network cannot take, naming the nearest valid ones."""
    if output_size(size, depth, grid=grid) is None:
        near = " or ".join(str(s) for s in valid_sizes_near(size, depth, grid=grid))
        network = f"depth-{depth} valid U-Net" + (f" on a grid of {grid}" if grid > 1 else "")
        raise UserInputError(f"{what} {size} does not fit the {network}", f"use {near}")
