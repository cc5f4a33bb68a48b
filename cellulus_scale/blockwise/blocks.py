"""Blocks with read and write regions (after daisy): a core that a task writes, and the larger
region it reads around it. Spatial only; frames are handled by the caller."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Block:
    """One block of a frame: ``index`` in the block grid, its ``core`` start and stop per axis."""

    index: tuple[int, ...]
    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    @property
    def core(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    def grown(self, halo: int | Sequence[int], bounds: Sequence[int]) -> tuple[slice, ...]:
        """The core grown by ``halo`` (one per axis, or the same on every axis) on every side,
        clipped to the frame."""
        halos = (halo,) * len(self.start) if isinstance(halo, int) else tuple(halo)
        return tuple(
            slice(max(0, a - h), min(size, b + h))
            for a, b, h, size in zip(self.start, self.stop, halos, bounds, strict=True)
        )

    def inner(self, region: Sequence[slice]) -> tuple[slice, ...]:
        """The core as slices into ``region``, a grown region that holds it."""
        return tuple(
            slice(a - r.start, b - r.start)
            for a, b, r in zip(self.start, self.stop, region, strict=True)
        )

    def owns(
        self, points: np.ndarray, shape: Sequence[int], block_size: Sequence[int]
    ) -> np.ndarray:
        """Which of the points (n, dims) this block owns (see :func:`owner_index`)."""
        return np.all(owner_index(points, shape, block_size) == np.asarray(self.index), axis=1)

    @property
    def name(self) -> str:
        return "_".join(str(i) for i in self.index)


def block_grid(shape: Sequence[int], block_size: Sequence[int]) -> list[Block]:
    """Cut a frame of ``shape`` into blocks of ``block_size`` (the last ones may be smaller)."""
    counts = [math.ceil(s / b) for s, b in zip(shape, block_size, strict=True)]
    blocks = []
    for index in np.ndindex(*counts):
        start = tuple(i * b for i, b in zip(index, block_size, strict=True))
        stop = tuple(min(a + b, s) for a, b, s in zip(start, block_size, shape, strict=True))
        blocks.append(Block(tuple(int(i) for i in index), start, stop))
    return blocks


def owner_index(points: np.ndarray, shape: Sequence[int], block_size: Sequence[int]) -> np.ndarray:
    """Grid index of the block owning each point (n, dims): the block whose core holds the
    point, after clamping the point into the frame."""
    upper = np.asarray(shape) - 1
    clamped = np.clip(np.floor(points).astype(np.int64), 0, upper)
    return clamped // np.asarray(block_size)


def halo_in_voxels(distance: float, spacing: Sequence[float] | None) -> int | tuple[int, ...]:
    """A halo of ``distance`` in-plane pixels as whole voxels per axis, for voxels of
    ``spacing`` (their size per axis in in-plane pixels; None: the same on every axis)."""
    if spacing is None:
        return int(math.ceil(distance))
    return tuple(int(math.ceil(distance / s - 1e-9)) for s in spacing)
