"""Block-independent padding and noise: functions of the global pixel position alone.

- :func:`reflect_indices`: global indices of a window with 'reflect' padding at the border;
- :func:`position_uniform` / :func:`position_uniform_torch`: uniform numbers that depend only
  on (seed, frame, pass, global position), drawn by numpy or by torch on the network's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def reflect_indices(start: int, stop: int, length: int) -> np.ndarray:
    """Global indices for positions start..stop-1 with 'reflect' padding outside [0, length)."""
    positions = np.arange(start, stop, dtype=np.int64)
    if length == 1:
        return np.zeros_like(positions)
    period = 2 * (length - 1)
    folded = np.mod(positions, period)
    return np.where(folded < length, folded, period - folded)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def position_uniform(
    seed: int, frame: int, tta_pass: int, grids: Sequence[np.ndarray]
) -> np.ndarray:
    """Uniform [0, 1) numbers that depend only on (seed, frame, pass, global pixel position).

    ``grids`` are broadcastable integer arrays of global coordinates, one per spatial axis.
    A counter-based hash (splitmix64), so any block of any size draws the same numbers.
    """
    key = _splitmix64(
        np.array([seed, frame, tta_pass], dtype=np.uint64).sum(dtype=np.uint64)
        + np.uint64(frame) * np.uint64(1_000_003)
        + np.uint64(tta_pass) * np.uint64(7919)
        + np.uint64(seed) * np.uint64(104_729)
    )
    state = np.broadcast_to(key, np.broadcast_shapes(*[g.shape for g in grids])).astype(np.uint64)
    for grid in grids:
        state = _splitmix64(state ^ grid.astype(np.uint64))
    return (state >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def _as_int64(value: int) -> int:
    """The int64 with the bits of the unsigned 64-bit ``value`` (torch has no full uint64)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (``>>`` on int64 is arithmetic)."""
    return (values >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64_torch(values: torch.Tensor) -> torch.Tensor:
    """:func:`_splitmix64` on int64 tensors: the same bits, with wrap-around arithmetic."""
    z = values + _as_int64(0x9E3779B97F4A7C15)
    z = (z ^ _shift_right(z, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right(z, 27)) * _as_int64(0x94D049BB133111EB)
    return z ^ _shift_right(z, 31)


def position_uniform_torch(
    seed: int,
    frame: int,
    tta_pass: int,
    grids: Sequence[np.ndarray],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """:func:`position_uniform` computed by torch on ``device``: bit-identical numbers (float64),
    so the test-time noise of a block can be drawn where the network runs."""
    key = _splitmix64(
        np.array([seed, frame, tta_pass], dtype=np.uint64).sum(dtype=np.uint64)
        + np.uint64(frame) * np.uint64(1_000_003)
        + np.uint64(tta_pass) * np.uint64(7919)
        + np.uint64(seed) * np.uint64(104_729)
    )
    state = torch.tensor(_as_int64(int(key)), dtype=torch.int64, device=device)
    for grid in grids:
        coordinates = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.int64)).to(device)
        state = _splitmix64_torch(state ^ coordinates)
    shape = np.broadcast_shapes(*[g.shape for g in grids])
    return _shift_right(state.expand(shape), 11).double() * (1.0 / 2**53)
