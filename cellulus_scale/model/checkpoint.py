"""One-file checkpoints: weights, the whole model configuration, normalisation, training state.

Loaded with ``torch.load(weights_only=True)``: only tensors and plain Python values, never
arbitrary pickled objects. That guarantee holds from torch 2.10 on: CVE-2025-32434 and
CVE-2026-24747 let crafted files run code through ``weights_only=True`` on older versions, so
checkpoints are not loaded with them (the package requires ``torch>=2.10``).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cellulus_scale.config import ModelConfig
from cellulus_scale.errors import UserInputError
from cellulus_scale.io.location import Location, is_url
from cellulus_scale.kernels.normalisation import Normalisation
from cellulus_scale.model.unet import UNet

FORMAT = "cellulus-scale-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """Everything needed to predict with, or resume training of, a model."""

    kind: str  # "oce" (self-supervised) or "stardist" (supervised)
    model_config: ModelConfig
    normalisation: Normalisation
    state_dict: dict[str, torch.Tensor]
    data_axes: str
    train_config: dict[str, Any] = field(default_factory=dict)
    training_state: dict[str, Any] = field(default_factory=dict)

    def build_model(self, device: torch.device | str = "cpu") -> UNet:
        model = UNet(self.model_config)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike[str]) -> None:
    """Write atomically: a partly written checkpoint never replaces a good one."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": checkpoint.kind,
        "model_config": checkpoint.model_config.to_dict(),
        "normalisation": checkpoint.normalisation.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in checkpoint.state_dict.items()},
        "data_axes": checkpoint.data_axes,
        "train_config": checkpoint.train_config,
        "training_state": checkpoint.training_state,
    }
    temporary = path.with_name(path.name + ".partial")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def _unreadable(source: Path | io.BytesIO, error: Exception) -> str:
    """Why torch.load failed, in words: not a PyTorch file, damaged, or not plain values."""
    if isinstance(source, io.BytesIO):
        head = source.getvalue()[:4]
    else:
        with source.open("rb") as handle:
            head = handle.read(4)
    if not head:
        return "the file is empty"
    message = str(error)
    if head == b"PK\x03\x04":  # torch.save writes a zip archive
        if "Weights only load failed" in message:
            return "it holds Python objects, not only tensors and plain values"
        return "the file is truncated or damaged"
    if head[:1] == b"\x80":  # a legacy pickle
        return "an old-style pickle, not a checkpoint of this program"
    return "not a PyTorch file"


#: The oldest torch whose ``torch.load(weights_only=True)`` has no known way to run code.
SAFE_TORCH = (2, 10)


def check_safe_torch(version: str | None = None) -> None:
    """Refuse to load checkpoints with a torch (``version``, by default the one imported) older
    than :data:`SAFE_TORCH`."""
    version = str(torch.__version__) if version is None else version
    numbers = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits) if digits else 0)
    if tuple(numbers) < SAFE_TORCH:
        raise UserInputError(
            f"torch {version} is older than 2.10, whose torch.load(weights_only=True) a crafted"
            " file can make run code (CVE-2025-32434, CVE-2026-24747)",
            "install torch 2.10 or newer (pip install 'torch>=2.10')",
        )


def load_checkpoint(path: str | os.PathLike[str], kind: str | None = None) -> Checkpoint:
    """Load and check a checkpoint (a local path, or a URL in object storage); bad files give a
    UserInputError naming the problem."""
    check_safe_torch()
    source: Path | io.BytesIO
    if is_url(path):
        try:
            source = io.BytesIO(Location.of(path).read_bytes())
        except FileNotFoundError:
            raise UserInputError(
                f"no model checkpoint at {path}", "train one with 'cellulus-scale train'"
            ) from None
        except Exception as error:  # denied, no credentials, an unreachable endpoint, ...
            raise UserInputError(
                f"cannot read the model {path} ({type(error).__name__}:"
                f" {' '.join(str(error).split())[:80]})",
                "check the URL and the credentials in the environment (e.g. AWS_ACCESS_KEY_ID,"
                " AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)",
            ) from None
    else:
        source = Path(path)
        if not source.is_file():
            raise UserInputError(
                f"no model checkpoint at {path}", "train one with 'cellulus-scale train'"
            )
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserInputError(
            f"{path} is not a readable cellulus-scale checkpoint ({_unreadable(source, error)})",
            "pass a MODEL.pt written by 'cellulus-scale train'",
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserInputError(
            f"{path} is not a cellulus-scale checkpoint (it comes from another program or model)",
            "pass a MODEL.pt written by 'cellulus-scale train'",
        )
    if payload.get("format_version") != FORMAT_VERSION:
        raise UserInputError(
            f"{path} is a checkpoint of format version {payload.get('format_version')}, but this"
            f" version of cellulus-scale reads version {FORMAT_VERSION}",
            "use the matching cellulus-scale version, or retrain",
        )
    try:
        if kind is not None and payload["kind"] != kind:
            raise UserInputError(
                f"{path} holds a '{payload['kind']}' model, but a '{kind}' model is needed here",
                "pass a checkpoint of the right kind",
            )
        config = ModelConfig.from_dict(payload["model_config"])
        checkpoint = Checkpoint(
            kind=payload["kind"],
            model_config=config,
            normalisation=Normalisation(**payload["normalisation"]),
            state_dict=payload["state_dict"],
            data_axes=payload["data_axes"],
            train_config=payload.get("train_config", {}),
            training_state=payload.get("training_state", {}),
        )
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, UserInputError):
            raise
        raise UserInputError(
            f"{path}: the checkpoint is incomplete or damaged ({type(error).__name__}: {error})",
            "retrain or use another checkpoint",
        ) from None
    try:
        UNet(config).load_state_dict(checkpoint.state_dict)
    except (RuntimeError, ValueError, TypeError):
        raise UserInputError(
            f"{path}: the weights do not match the model configuration stored with them",
            "the file is damaged; retrain or use another checkpoint",
        ) from None
    return checkpoint


def check_compatible(checkpoint: Checkpoint, spatial_dims: int, channels: int, where: str) -> None:
    """Refuse a model trained for other dimensions or channels than the data."""
    config = checkpoint.model_config
    if config.spatial_dims != spatial_dims or config.in_channels != channels:
        raise UserInputError(
            f"the model is for {config.spatial_dims}D images with {config.in_channels} channel(s),"
            f" but {where} is {spatial_dims}D with {channels} channel(s)",
            "use a model trained on data of this layout",
        )
