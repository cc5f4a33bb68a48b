"""Running a network on one window: its arithmetic on a GPU, and the StarDist head's outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


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


def predict_probability(
    model: Any, image: np.ndarray, device: Any, precision: str = "float32"
) -> np.ndarray:
    """Probability and ray lengths (1 + n_rays, *out) of one normalised (C, *in) window,
    computed in ``precision`` on a GPU (see :func:`inference_precision`)."""
    with torch.no_grad():
        batch = torch.from_numpy(np.ascontiguousarray(image[None])).to(device)
        with inference_precision(device, precision):
            output = model(batch)[0]
        output = output.float()
        probability = torch.sigmoid(output[:1])
        distances = output[1:].clamp_min(0.0)
        return torch.cat([probability, distances]).cpu().numpy()
