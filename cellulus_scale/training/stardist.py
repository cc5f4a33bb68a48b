"""Supervised refinement (``cellulus-scale train-supervised``; seed, Appendix B).

A U-Net of the same blocks as the self-supervised model (depth 3; the cpu preset's depth 2 on
StarDist's grid of 2 in 2D, which predicts every second pixel), trained with the StarDist
objective (per-pixel object probability and star-convex radial distances) on an NGFF label
image: typically Cellulus' own segmentation (``out.zarr`` from ``predict`` holds a copy of the
image and ``labels/cellulus``), or true annotations. 2D objects are star-convex polygons (32
rays by default), 3D objects star-convex polyhedra (96 rays on a golden spiral by default). The
checkpoint is of kind "stardist" with ``out_channels = 1 + n_rays``; ``predict`` dispatches on
it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from cellulus_scale.config import (
    AUTO_PRESET,
    SUPERVISED_PRESETS,
    ModelConfig,
    SupervisedConfig,
    auto_preset,
)
from cellulus_scale.errors import UserInputError
from cellulus_scale.io.ome_zarr import OmeImage, open_labels, voxel_spacing
from cellulus_scale.kernels.star_convex import DEFAULT_RAYS, MIN_RAYS
from cellulus_scale.model.device import choose_device
from cellulus_scale.model.loss import stardist_loss
from cellulus_scale.model.unet import (
    axis_flat_levels,
    check_input_size,
    contexts,
    largest_valid_size_at_most,
    smallest_valid_size_at_least,
)
from cellulus_scale.training.crops import (
    LabelledCrops,
    check_labels_match,
    crop_shape,
    median_object_size,
)
from cellulus_scale.training.loop import (
    Recipe,
    TrainingOptions,
    TrainResult,
    autocast,
    open_training_image,
    prepare_training,
    run_training,
)

KIND = "stardist"
INIT_CROPS = 8  # crops whose targets set the initial ray length
LOG_COLUMNS = ["step", "epoch", "loss", "prob", "dist", "lr", "seconds", "data_wait"]


def crop_planes(model_config: ModelConfig, crop_size: int, depth_planes: int) -> int:
    """Planes per 3D crop: the physical extent of the in-plane side ``crop_size``, at most the
    whole stack and the network's z context on each side of it (reflected, as prediction reads
    a stack), the largest size the network takes along z (its flat levels leave z alone);
    refuses a stack too thin for the network."""
    spacing = model_config.spacing or (1.0, 1.0, 1.0)
    flat = axis_flat_levels(model_config)[0]
    extent = math.ceil(crop_size * float(spacing[-1]) / float(spacing[0]))
    reach = depth_planes + 2 * contexts(model_config)[0]
    planes = largest_valid_size_at_most(min(reach, extent), model_config.depth, flat)
    if planes is None:
        smallest = smallest_valid_size_at_least(1, model_config.depth, flat)
        raise UserInputError(
            f"the stack has {depth_planes} planes, fewer than the smallest crop the"
            f" depth-{model_config.depth} network takes ({smallest} planes for this voxel size)",
            "train on a stack with more planes, or check the voxel size in its NGFF scale",
        )
    return planes


def volume_crop_side(
    image: OmeImage, preset: str, device: str, depth: int | None = None
) -> int | None:
    """The in-plane crop side for a 3D image: the preset's ``volume_crop_size``, at most the
    largest the planes allow, valid for the preset's network (``depth`` where given); None where
    the planes are too small (the crop check then says so)."""
    name = auto_preset(choose_device(device).type) if preset == AUTO_PRESET else preset
    if name not in SUPERVISED_PRESETS:
        return None  # resolve_configs names the unknown preset
    chosen = SUPERVISED_PRESETS[name]
    side = min(chosen.train.volume_crop_size, *image.canonical_shape[-2:])
    return largest_valid_size_at_most(side, chosen.model.depth if depth is None else depth)


def check_supervised_crop(
    model_config: ModelConfig, config: SupervisedConfig, spatial_shape: tuple[int, ...]
) -> tuple[int, ...] | None:
    """Refuse crops the depth-``d`` network cannot take or that do not fit in the image. 2D:
    squares of ``crop_size`` (returns None); 3D: ``crop_size`` in-plane by :func:`crop_planes`
    planes (returns the shape)."""
    depth, grid = model_config.depth, model_config.grid
    dims = len(spatial_shape)
    if grid > 1 and dims != 2:
        raise UserInputError(
            f"--grid {grid} is for 2D images; this image is {dims}D", "drop --grid"
        )
    check_input_size(config.crop_size, depth, grid=grid)
    side = min(spatial_shape[-2:])
    if config.crop_size > side:
        largest = largest_valid_size_at_most(side, depth, grid=grid)
        shape = "x".join(map(str, spatial_shape))
        if largest is None:
            raise UserInputError(
                f"the image ({shape}) is smaller than the smallest crop the depth-{depth}"
                " network can take",
                "train on larger images",
            )
        raise UserInputError(
            f"crop size {config.crop_size} is larger than the image ({shape})",
            f"use --crop-size {largest} or smaller (a size the depth-{depth} network can take)",
        )
    if config.n_rays < MIN_RAYS[dims]:
        raise UserInputError(
            f"--n-rays {config.n_rays} is too few for {dims}D images",
            f"use e.g. --n-rays {DEFAULT_RAYS[dims]}",
        )
    if model_config.outputs != 1 + config.n_rays:
        raise UserInputError(
            f"the model has {model_config.outputs} outputs, but {config.n_rays} rays need"
            f" {1 + config.n_rays}",
            "drop --out-channels; it follows from --n-rays",
        )
    if dims == 3:
        return (crop_planes(model_config, config.crop_size, spatial_shape[0]),) + (
            config.crop_size,
        ) * 2
    return None


SUPERVISED = Recipe(
    KIND,
    SUPERVISED_PRESETS,
    SupervisedConfig,
    check_supervised_crop,
    LOG_COLUMNS,
    "StarDist loss",
)


def train_supervised(
    image_path: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    labels: str | None = None,
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
    """Train a StarDist model (the preset's) on random crops of an OME-Zarr image and of its label
    image ``labels/<labels>``; write MODEL.pt (kind "stardist") beside a CSV loss log and a PNG
    loss plot. ``overrides`` take any ModelConfig or SupervisedConfig field.

    As :func:`cellulus_scale.training.oce.train`: every crop is a function of (seed, crop
    index), so ``resume=True`` continues exactly; on resume the checkpoint's settings are kept
    (``labels`` may be left out), ``epochs`` and ``num_workers`` may change."""
    model_path = Path(model_path)
    options = TrainingOptions(
        preset, axes, epochs, max_minutes, device, seed, resume, overwrite, progress
    )
    image, torch_device = open_training_image(image_path, options)
    if labels is not None:  # checked before anything is read or estimated
        check_labels_match(image, open_labels(image.path, labels), labels)
        overrides["labels"] = labels
    elif not resume:
        raise UserInputError(
            "--labels is missing",
            "name the label image to learn from, e.g. --labels cellulus (a 'predict' output)",
        )
    if not resume and image.spatial_dims == 3:
        overrides.setdefault("n_rays", DEFAULT_RAYS[3])  # rays on a sphere: 96 by default in 3D
        overrides.setdefault("grid", 1)  # the preset's depth, without its grid (2D only)
        # anisotropic voxels: the network's first levels flat, as the OCE model's
        overrides.setdefault("spacing", voxel_spacing(image))
        if "crop_size" not in overrides:
            side = volume_crop_side(image, preset, device, overrides.get("depth"))
            if side is not None:
                overrides["crop_size"] = side
    if "n_rays" in overrides and not resume:
        overrides.setdefault("out_channels", 1 + int(overrides["n_rays"]))
    setup = prepare_training(image, model_path, SUPERVISED, options, overrides)
    config: SupervisedConfig = setup.train_config
    label_image = open_labels(image.path, config.labels)
    check_labels_match(image, label_image, config.labels)
    margins = contexts(setup.model_config)
    trusted_area = None
    if config.trusted_size is not None:
        typical = median_object_size(
            label_image, crop_shape(image, setup.crop, margins), config.seed
        )
        trusted_area = (config.trusted_size[0] * typical, config.trusted_size[1] * typical)

    def make_dataset(length: int) -> LabelledCrops:
        return LabelledCrops(
            image,
            label_image,
            setup.crop,
            margins,
            setup.normalisation,
            config.seed,
            length,
            config.n_rays,
            config.ignore_cut_objects,
            trusted_area,
            config.trusted_solidity,
            setup.model_config.grid,
            setup.model_config.ray_anisotropy,
        )

    def step_loss(
        model: torch.nn.Module, batch: tuple[torch.Tensor, ...], step: int
    ) -> tuple[torch.Tensor, list[str]]:
        crops, probability, distances, weight = batch
        with autocast(torch_device):
            output = model(crops)
        loss, parts = stardist_loss(
            output.float(),
            probability,
            distances,
            weight,
            config.dist_weight,
            config.reg_weight,
        )
        return loss, [f"{parts['prob']:.6f}", f"{parts['dist']:.6f}"]

    def initialise(model: torch.nn.Module) -> None:
        """Start the ray lengths at the mean object ray length of the first crops (the output
        is linear, as StarDist's; from zero it takes many steps to reach the objects' size)."""
        sample = make_dataset(INIT_CROPS)
        targets = [sample[i] for i in range(INIT_CROPS)]
        inside = torch.cat([d[:, p > 0].flatten() for _, p, d, _ in targets])
        if inside.numel():
            with torch.no_grad():
                model.head[-1].bias[1:] = inside.mean()

    return run_training(
        setup, model_path, SUPERVISED, make_dataset, step_loss, options, torch_device, initialise
    )
