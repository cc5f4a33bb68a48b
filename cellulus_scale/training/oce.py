"""Self-supervised OCE training (``cellulus-scale train``; seed, Appendix A)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cellulus_scale.config import (
    AUTO_PRESET,
    PRESETS,
    ModelConfig,
    Preset,
    TrainConfig,
    auto_preset,
)
from cellulus_scale.errors import UserInputError
from cellulus_scale.io.ome_zarr import OmeImage, voxel_spacing
from cellulus_scale.model.device import choose_device
from cellulus_scale.model.loss import oce_loss, sample_pairs
from cellulus_scale.model.unet import (
    axis_flat_levels,
    check_input_size,
    output_size,
    smallest_valid_size_at_least,
)
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


def smallest_trainable_crop(depth: int, kappa: float, flat_levels: int = 0) -> int:
    """The smallest crop whose output leaves room for pairs within radius ``kappa`` (pixels
    along this axis; ``flat_levels`` as in :func:`~cellulus_scale.model.unet.output_size`)."""
    size = smallest_valid_size_at_least(1, depth, flat_levels)
    while (output_size(size, depth, flat_levels) or 0) <= 2 * math.floor(kappa):
        size = smallest_valid_size_at_least(size + 1, depth, flat_levels)
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


def largest_crop_within(side: int, depth: int, kappa: float, flat_levels: int = 0) -> int | None:
    """The largest crop the depth-``depth`` network can take that fits a side of ``side``
    pixels and leaves room for pairs within ``kappa``; None if there is none."""
    smallest = smallest_trainable_crop(depth, kappa, flat_levels)
    return next(
        (
            s
            for s in range(side, smallest - 1, -1)
            if output_size(s, depth, flat_levels) is not None
        ),
        None,
    )


def crop_planes(model_config: ModelConfig, config: TrainConfig, depth_planes: int) -> int:
    """Planes per 3D crop: ``config.crop_depth`` (checked), or by default the physical extent of
    the in-plane side, at most the whole stack (the largest size the network takes that fits);
    refuses a stack too thin to train on."""
    spacing = model_config.spacing or (1.0, 1.0, 1.0)
    flat = axis_flat_levels(model_config)[0]
    kappa = config.kappa / float(spacing[0])
    smallest = smallest_trainable_crop(model_config.depth, kappa, flat)
    if smallest > depth_planes:
        raise UserInputError(
            f"the stack has {depth_planes} planes, fewer than the smallest trainable crop"
            f" ({smallest} planes for this network and voxel size)",
            "train on a stack with more planes, or check the voxel size (--voxel-size Z,Y,X)",
        )
    if config.crop_depth is not None:
        planes = config.crop_depth
        if output_size(planes, model_config.depth, flat) is None or planes < smallest:
            fits = largest_crop_within(depth_planes, model_config.depth, kappa, flat)
            raise UserInputError(
                f"--crop-depth {planes} does not suit the network (at least {smallest} planes,"
                " a size it can take)",
                f"use --crop-depth between {smallest} and {fits}",
            )
        if planes > depth_planes:
            fits = largest_crop_within(depth_planes, model_config.depth, kappa, flat)
            raise UserInputError(
                f"--crop-depth {planes} is larger than the stack ({depth_planes} planes)",
                f"use --crop-depth {fits} or less",
            )
        return planes
    extent = math.ceil(config.crop_size * float(spacing[-1]) / float(spacing[0]))
    wanted = max(smallest, min(depth_planes, extent))
    fits = largest_crop_within(wanted, model_config.depth, kappa, flat)
    assert fits is not None  # smallest <= wanted
    return fits


def check_crop_shape(
    model_config: ModelConfig, config: TrainConfig, shape: tuple[int, ...]
) -> tuple[int, ...] | None:
    """Refuse crops that do not suit the network or the image. 2D: squares of ``crop_size``
    (returns None); 3D: ``crop_size`` in-plane and :func:`crop_planes` planes, pairs within the
    physical radius ``kappa``."""
    if model_config.grid != 1:
        raise UserInputError(
            "a grid is for StarDist models: an OCE model embeds every pixel", "drop grid"
        )
    if len(shape) == 2:
        check_crop_size(config.crop_size, model_config.depth, config.kappa, shape)
        return None
    spacing = model_config.spacing or (1.0, 1.0, 1.0)
    in_plane_kappa = config.kappa / float(min(spacing[1:]))
    check_crop_size(config.crop_size, model_config.depth, in_plane_kappa, shape[1:])
    return (crop_planes(model_config, config, shape[0]), config.crop_size, config.crop_size)


def volume_crop_side(image: OmeImage, preset: Preset, spacing: Sequence[float] | None) -> int:
    """The default in-plane crop side for a 3D image: the preset's ``volume_crop_size``, at most
    the largest the image's planes allow; refuses planes too small to train on."""
    height, width = image.canonical_shape[-2:]
    kappa = preset.train.kappa / float(min(spacing[1:])) if spacing else preset.train.kappa
    fits = largest_crop_within(min(height, width), preset.model.depth, kappa)
    if fits is None:
        smallest = smallest_trainable_crop(preset.model.depth, kappa)
        raise UserInputError(
            f"the planes of {image.path} ({height}x{width}) are smaller than the smallest"
            f" trainable crop ({smallest} px)",
            "pass --model MODEL.pt, trained with 'cellulus-scale train' on larger images",
        )
    return min(preset.train.volume_crop_size, fits)


def check_trainable(
    image: OmeImage, preset: Preset, voxel_size: Sequence[float] | None = None
) -> None:
    """Refuse, before anything starts, an image too small to train the preset's model on."""
    spacing = voxel_spacing(image, voxel_size)
    spatial = tuple(image.canonical_shape[-image.spatial_dims :])
    if image.spatial_dims == 2:
        if largest_crop_within(min(spatial), preset.model.depth, preset.train.kappa) is None:
            raise UserInputError(
                f"{image.path} ({'x'.join(map(str, spatial))}) is too small to train a model on",
                "pass --model MODEL.pt, trained with 'cellulus-scale train' on larger images",
            )
        return
    model_config = replace(preset.model, spatial_dims=3, spacing=spacing)
    side = volume_crop_side(image, preset, spacing)
    check_crop_shape(model_config, replace(preset.train, crop_size=side), spatial)


def _check_crop(
    model_config: ModelConfig, config: TrainConfig, shape: tuple[int, ...]
) -> tuple[int, ...] | None:
    return check_crop_shape(model_config, config, shape)


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
    voxel_size: Sequence[float] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train the mini U-Net on random crops of an OME-Zarr image; write MODEL.pt beside a CSV loss
    log and a PNG loss plot. ``overrides`` take any ModelConfig or TrainConfig field.

    Every crop is a function of (seed, crop index) and every pair sample of (seed, step), and the
    learning rate of the epoch, so ``resume=True`` continues exactly where the checkpoint stopped:
    stopping (``max_minutes``, ``epochs``) and resuming gives the same weights as one run. On
    resume the checkpoint's settings are kept (``preset`` and ``seed`` are ignored); ``epochs``
    and ``num_workers`` may change, any other override must equal the stored value.

    3D images: the voxel size (``voxel_size`` Z,Y,X, else the NGFF scale) is stored with the
    model (:attr:`~cellulus_scale.config.ModelConfig.spacing`): offsets, the partner radius
    ``kappa`` and distances are in in-plane pixels, and the first levels of the network are flat
    where the z step is coarse. Crops are ``crop_size`` in-plane (by default the preset's
    ``volume_crop_size``, at most what the planes allow) by ``crop_depth`` planes."""
    model_path = Path(model_path)
    options = TrainingOptions(
        preset, axes, epochs, max_minutes, device, seed, resume, overwrite, progress
    )
    image, torch_device = open_training_image(image_path, options)
    if image.spatial_dims == 3:
        spacing = voxel_spacing(image, voxel_size)
        if not resume or voxel_size is not None:  # a resumed run keeps the checkpoint's
            overrides["spacing"] = spacing
        if "crop_size" not in overrides and not resume:
            name = auto_preset(choose_device(device).type) if preset == AUTO_PRESET else preset
            if name in PRESETS:
                chosen = PRESETS[name]
                if "depth" in overrides:
                    chosen = replace(chosen, model=replace(chosen.model, depth=overrides["depth"]))
                overrides["crop_size"] = volume_crop_side(image, chosen, spacing)
    setup = prepare_training(image, model_path, OCE, options, overrides)
    train_config: TrainConfig = setup.train_config
    spacing_used = setup.model_config.spacing

    def make_dataset(length: int) -> RandomCrops:
        return RandomCrops(
            image,
            setup.crop,
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
            spacing_used,
        )
        loss, parts = oce_loss(
            offsets,
            anchors,
            partners,
            train_config.tau,
            train_config.lambda_reg,
            train_config.damping,
            spacing_used,
        )
        return loss, [f"{parts['pair']:.6f}", f"{parts['reg']:.4f}"]

    return run_training(setup, model_path, OCE, make_dataset, step_loss, options, torch_device)
