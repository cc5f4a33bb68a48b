"""Which torch device runs a model."""

from __future__ import annotations

import torch

from cellulus_scale.errors import UserInputError


def choose_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA where present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError(
            "--device cuda was asked for but no CUDA GPU is available", "use --device auto or cpu"
        )
    return torch.device(device)


def worker_device(requested: str) -> torch.device:
    """The device of a prediction task on a Dask worker: 'auto' picks CUDA where that worker
    has it (the request was checked where the run started)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
