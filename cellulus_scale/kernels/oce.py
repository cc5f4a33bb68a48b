"""Test-time-augmented OCE offsets and their std for one block (torch in, numpy out)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from cellulus_scale.kernels.inference import inference_precision
from cellulus_scale.kernels.noise import position_uniform_torch

#: Input pixels of one batch of test-time passes on a GPU (activations of about 2 GB for the
#: paper's model); the passes of a larger block run in equal batches below this.
GPU_BATCH_PIXELS = 2**21


def passes_per_batch(passes: int, pixels: int, device_type: str) -> int:
    """Passes per forward batch: on a GPU as many as fit :data:`GPU_BATCH_PIXELS`, split evenly;
    on the CPU 8, which keeps its memory small."""
    if device_type != "cuda":
        return 8
    fits = max(1, min(passes, GPU_BATCH_PIXELS // max(pixels, 1)))
    return math.ceil(passes / math.ceil(passes / fits))


def tta_noise_values(passes: int, values: Sequence[float]) -> list[float]:
    """The salt-and-pepper value of each pass: the passes split evenly over ``values``."""
    return [values[i * len(values) // passes] for i in range(passes)]


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
