"""Self-supervised OCE training (``cellulus-scale train``; seed, Appendix A)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from cellulus_scale.config import AUTO_PRESET, PRESETS, ModelConfig, TrainConfig
from cellulus_scale.errors import UserInputError
from cellulus_scale.model.loss import oce_loss, sample_pairs
from cellulus_scale.model.unet import check_input_size, output_size, smallest_valid_size_at_least
from cellulus_scale.training.crops import RandomCrops
from cellulus_scale.training.loop import (
    Recipe,
    TrainingOptions,
    TrainResult,
    autocast,
    open_training_image,
    prepare_training,
    run_training,
)

LOG_COLUMNS = ["step", "epoch", "loss", "pair", "reg", "lr", "seconds", "data_wait"]


def smallest_trainable_crop(depth: int, kappa: float) -> int:
    """The smallest crop whose output leaves room for pairs within radius ``kappa``."""
    size = smallest_valid_size_at_least(1, depth)
    while (output_size(size, depth) or 0) <= 2 * math.floor(kappa):
        size = smallest_valid_size_at_least(size + 1, depth)
    return size


def check_crop_size(
    crop_size: int, depth: int, kappa: float, spatial_shape: tuple[int, ...]
) -> None:
    """Refuse crops the network cannot take, that leave too few output pixels for pairs, or that
    do not fit in the image; the message names the sizes that would work."""
    check_input_size(crop_size, depth)
    smallest = smallest_trainable_crop(depth, kappa)
    out_size = output_size(crop_size, depth)
    assert out_size is not None
    side = min(spatial_shape)
    if crop_size < smallest:
        raise UserInputError(
            f"crop size {crop_size} leaves {out_size} output pixels, too few for pairs"
            f" within radius {kappa:g}",
            f"use --crop-size {smallest} or larger (a size the depth-{depth} network can take)",
        )
    if crop_size > side:
        largest = largest_crop_within(side, depth, kappa)
        shape = "x".join(map(str, spatial_shape))
        if largest is None:
            raise UserInputError(
                f"the image ({shape}) is smaller than the smallest trainable crop ({smallest} px)",
                "train on larger images",
            )
        raise UserInputError(
            f"crop size {crop_size} is larger than the image ({shape})",
            f"use --crop-size {largest} or smaller (a size the depth-{depth} network can take)",
        )


def largest_crop_within(side: int, depth: int, kappa: float) -> int | None:
    """The largest crop the depth-``depth`` network can take that fits a side of ``side``
    pixels and leaves room for pairs within ``kappa``; None if there is none."""
    smallest = smallest_trainable_crop(depth, kappa)
    return next(
        (s for s in range(side, smallest - 1, -1) if output_size(s, depth) is not None), None
    )


def _check_crop(model_config: ModelConfig, config: TrainConfig, shape: tuple[int, ...]) -> None:
    check_crop_size(config.crop_size, model_config.depth, config.kappa, shape)


OCE = Recipe("oce", PRESETS, TrainConfig, _check_crop, LOG_COLUMNS, "OCE loss")


def train(
    image_path: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    preset: str = AUTO_PRESET,
    axes: str | None = None,
    epochs: int | None = None,
    max_minutes: float | None = None,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> TrainResult:
    """Train the mini U-Net on random crops of an OME-Zarr image; write MODEL.pt beside a CSV loss
    log and a PNG loss plot. ``overrides`` take any ModelConfig or TrainConfig field.

    Every crop is a function of (seed, crop index) and every pair sample of (seed, step), and the
    learning rate of the epoch, so ``resume=True`` continues exactly where the checkpoint stopped:
    stopping (``max_minutes``, ``epochs``) and resuming gives the same weights as one run. On
    resume the checkpoint's settings are kept (``preset`` and ``seed`` are ignored); ``epochs``
    and ``num_workers`` may change, any other override must equal the stored value."""
    model_path = Path(model_path)
    options = TrainingOptions(
        preset, axes, epochs, max_minutes, device, seed, resume, overwrite, progress
    )
    image, torch_device = open_training_image(image_path, options)
    setup = prepare_training(image, model_path, OCE, options, overrides)
    train_config: TrainConfig = setup.train_config

    def make_dataset(length: int) -> RandomCrops:
        return RandomCrops(
            image,
            train_config.crop_size,
            setup.normalisation,
            train_config.seed,
            length=length,
            elastic=train_config.elastic,
        )

    def step_loss(
        model: torch.nn.Module, batch: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, list[str]]:
        generator = torch.Generator().manual_seed(train_config.seed * 1_000_003 + step)
        with autocast(torch_device):
            offsets = model(batch)
        offsets = offsets.float()
        anchors, partners = sample_pairs(
            tuple(offsets.shape[2:]),
            offsets.shape[0],
            train_config.pair_fraction,
            train_config.kappa,
            generator,
            torch_device,
        )
        loss, parts = oce_loss(
            offsets,
            anchors,
            partners,
            train_config.tau,
            train_config.lambda_reg,
            train_config.damping,
        )
        return loss, [f"{parts['pair']:.6f}", f"{parts['reg']:.4f}"]

    return run_training(setup, model_path, OCE, make_dataset, step_loss, options, torch_device)
