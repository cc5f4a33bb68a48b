"""Pure per-block kernels: numpy or torch in, numpy out. No Dask, no zarr.

- :func:`reflect_indices` / :func:`position_uniform`: block-independent padding and noise;
- :func:`predict_oce_block`: test-time-augmented OCE offsets and their std for one block;
- clustering and relabelling live in :mod:`cellulus_scale.clustering`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

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


def tta_noise_values(passes: int, values: Sequence[float]) -> list[float]:
    """The salt-and-pepper value of each pass: the passes split evenly over ``values``."""
    return [values[i * len(values) // passes] for i in range(passes)]


@contextlib.contextmanager
def inference_precision(device: torch.device | str, precision: str) -> Iterator[None]:
    """Run the network in ``precision`` on a CUDA device: ``float32`` (strict IEEE float32, no
    TF32), ``tf32`` (float32 with TF32 matrix units) or ``bfloat16`` (autocast). The CPU always
    computes in float32."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    tf32 = precision != "float32"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def predict_oce_block(
    model: torch.nn.Module,
    image: np.ndarray,
    source_grids: Sequence[np.ndarray],
    frame: int,
    passes: int,
    noise_fraction: float,
    noise_values: Sequence[float],
    seed: int,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    precision: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """Mean OCE offsets and summed std over test-time-augmented passes for one block.

    ``image`` is the normalised block with its halo, shape (C, *spatial); ``source_grids`` are the
    global coordinates each of its pixels was read from (after reflection), so the noise of a
    pixel is the same in every block. The noise is drawn on ``device``, where the passes run in
    batches of ``batch_size``, in ``precision`` (:func:`inference_precision`). Returns offsets
    (dims, *out) and std (*out) as float32.
    With ``passes == 1`` no noise is added.
    """
    pass_values = tta_noise_values(passes, noise_values)
    clean = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    total = None
    total_sq = None
    for start in range(0, passes, batch_size):
        inputs = []
        for tta_pass in range(start, min(start + batch_size, passes)):
            if passes == 1:
                inputs.append(clean)
                continue
            hit = position_uniform_torch(seed, frame, tta_pass, source_grids, device)
            inputs.append(clean.masked_fill(hit < noise_fraction, pass_values[tta_pass]))
        with inference_precision(device, precision):
            out = model(torch.stack(inputs))
        out = out.double()
        batch_sum = out.sum(dim=0)
        batch_sq = (out * out).sum(dim=0)
        total = batch_sum if total is None else total + batch_sum
        total_sq = batch_sq if total_sq is None else total_sq + batch_sq
    mean = total / passes
    variance = (total_sq / passes - mean * mean).clamp_min(0)
    std = variance.sqrt().sum(dim=0)
    return mean.float().cpu().numpy(), std.float().cpu().numpy()
