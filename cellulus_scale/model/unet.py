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


def _conv_block(dims: int, in_channels: int, out_channels: int) -> nn.Sequential:
    conv = _conv(dims)
    layers: list[nn.Module] = []
    channels = in_channels
    for kernel in (3, 1, 1, 3):
        layers += [conv(channels, out_channels, kernel), nn.ReLU(inplace=True)]
        channels = out_channels
    return nn.Sequential(*layers)


def _center_crop(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    slices = [slice(None), slice(None)]
    for size, target in zip(tensor.shape[2:], shape, strict=True):
        start = (size - target) // 2
        slices.append(slice(start, start + target))
    return tensor[tuple(slices)]


class UNet(nn.Module):
    """U-Net of valid convolutions: max-pool 2x down, nearest 2x up, cropped skips, 1x1 head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {config.spatial_dims}")
        self.config = config
        dims = config.spatial_dims
        widths = [
            config.feature_maps * config.feature_factor**level for level in range(config.depth + 1)
        ]
        self.down = nn.ModuleList()
        channels = config.in_channels
        for level in range(config.depth):
            self.down.append(_conv_block(dims, channels, widths[level]))
            channels = widths[level]
        self.bottom = _conv_block(dims, channels, widths[config.depth])
        self.up = nn.ModuleList()
        channels = widths[config.depth]
        for level in reversed(range(config.depth)):
            self.up.append(_conv_block(dims, channels + widths[level], widths[level]))
            channels = widths[level]
        conv = _conv(dims)
        self.head = nn.Sequential(
            conv(channels, channels, 1), nn.ReLU(inplace=True), conv(channels, config.outputs, 1)
        )
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for block, skip in zip(self.up, reversed(skips), strict=True):
            x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.cat([_center_crop(skip, x.shape[2:]), x], dim=1)
            x = block(x)
        return self.head(x)


def output_size(input_size: int, depth: int) -> int | None:
    """Output length of the valid U-Net along one axis, or None if the input cannot be taken."""
    size = input_size
    for _ in range(depth):
        size -= 2 * _BLOCK_LOSS
        if size < 2 or size % 2:
            return None
        size //= 2
    size -= 2 * _BLOCK_LOSS
    if size < 1:
        return None
    for _ in range(depth):
        size = size * 2 - 2 * _BLOCK_LOSS
        if size < 1:
            return None
    return size


def context(depth: int) -> int:
    """Pixels lost per side (the halo a block needs), computed from the architecture."""
    size = smallest_valid_size_at_least(1, depth)
    out = output_size(size, depth)
    assert out is not None
    return (size - out) // 2


def valid_sizes_near(size: int, depth: int) -> list[int]:
    """The valid input sizes nearest to ``size``: the largest below and the smallest above."""
    below = [s for s in range(size, 0, -1) if output_size(s, depth) is not None][:1]
    above = [s for s in range(size, size + 64 * 2**depth) if output_size(s, depth) is not None][:1]
    return sorted(set(below + above))


def smallest_valid_size_at_least(size: int, depth: int) -> int:
    """The smallest input size >= ``size`` that the network can take."""
    while output_size(size, depth) is None:
        size += 1
    return size


def check_input_size(size: int, depth: int, what: str = "crop size") -> None:
    """Refuse (UserInputError) a ``size`` the network cannot take, naming the nearest valid ones."""
    if output_size(size, depth) is None:
        near = " or ".join(str(s) for s in valid_sizes_near(size, depth))
        raise UserInputError(
            f"{what} {size} does not fit the depth-{depth} valid U-Net", f"use {near}"
        )
