"""Self-supervised OCE training (``cellulus-scale train``)."""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cellulus_scale.checkpoint import Checkpoint, check_compatible, load_checkpoint, save_checkpoint
from cellulus_scale.config import PRESETS, ModelConfig, TrainConfig
from cellulus_scale.data import (
    RandomCrops,
    crops_per_epoch,
    estimate_normalisation,
)
from cellulus_scale.errors import UserInputError
from cellulus_scale.loss import oce_loss, sample_pairs
from cellulus_scale.model import UNet, check_input_size, output_size
from cellulus_scale.ome_io import OmeImage, check_complete, open_image

LOG_COLUMNS = ["step", "epoch", "loss", "pair", "reg", "lr", "seconds", "data_wait"]


@dataclass(frozen=True)
class TrainResult:
    """What a training run did."""

    checkpoint: Path
    steps: int
    total_steps: int
    final_loss: float
    seconds: float
    data_wait_fraction: float
    stopped_early: bool


def choose_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA where present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError(
            "--device cuda was asked for but no CUDA GPU is available", "use --device auto or cpu"
        )
    return torch.device(device)


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Step schedule: x ``lr_gamma`` after each milestone epoch."""
    drops = sum(1 for milestone in config.lr_milestones if epoch >= milestone)
    return config.learning_rate * config.lr_gamma**drops


def resolve_configs(
    preset: str, image: OmeImage, overrides: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """The preset's settings, adapted to the image layout, with user overrides applied."""
    if preset not in PRESETS:
        raise UserInputError(f"unknown preset '{preset}'", f"use one of {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    model_fields = {k: v for k, v in overrides.items() if k in ModelConfig.__dataclass_fields__}
    train_fields = {k: v for k, v in overrides.items() if k in TrainConfig.__dataclass_fields__}
    model_config = replace(
        chosen.model,
        spatial_dims=image.spatial_dims,
        in_channels=image.canonical_shape[1],
        **model_fields,
    )
    return model_config, replace(chosen.train, **train_fields)


def write_loss_plot(csv_path: Path, png_path: Path) -> None:
    """Plot the loss log (raw and smoothed) to a PNG."""
    from matplotlib.figure import Figure

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return
    steps = np.array([int(r["step"]) for r in rows])
    losses = np.array([float(r["loss"]) for r in rows])
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    figure = Figure(figsize=(6, 3.5), dpi=100)
    axis = figure.add_subplot()
    axis.plot(steps, losses, color="0.75", linewidth=0.8, label="loss")
    axis.plot(steps[window - 1 :], smooth, color="C0", label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("OCE loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path)


def train(
    image_path: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    preset: str = "paper",
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
    log and a PNG loss plot. ``overrides`` take any ModelConfig or TrainConfig field."""
    model_path = Path(model_path)
    image = open_image(image_path, axes)
    check_complete(image.path)
    if epochs is not None:
        overrides["epochs"] = epochs
    overrides["seed"] = seed
    torch_device = choose_device(device)
    if resume:
        if not model_path.exists():
            raise UserInputError(
                f"--resume: no checkpoint at {model_path}", "drop --resume to start"
            )
        checkpoint = load_checkpoint(model_path, kind="oce")
        check_compatible(checkpoint, image.spatial_dims, image.canonical_shape[1], str(image.path))
        model_config = checkpoint.model_config
        stored = dict(checkpoint.train_config)
        for key in ("lr_milestones", "normalisation_percentiles"):
            stored[key] = tuple(stored[key])
        if epochs is not None:
            stored["epochs"] = epochs
        train_config = TrainConfig(**stored)
        normalisation = checkpoint.normalisation
        state = checkpoint.training_state
    else:
        if model_path.exists() and not overwrite:
            raise UserInputError(
                f"{model_path} already exists", "pass --resume to continue it or --overwrite"
            )
        if not model_path.resolve().parent.exists():
            raise UserInputError(f"the folder of {model_path} does not exist", "create it first")
        model_config, train_config = resolve_configs(preset, image, overrides)
        check_input_size(train_config.crop_size, model_config.depth)
        normalisation = estimate_normalisation(
            image,
            train_config.crop_size,
            train_config.normalisation_samples,
            train_config.normalisation_percentiles,
            train_config.seed,
        )
        state = {}
    check_input_size(train_config.crop_size, model_config.depth)
    out_size = output_size(train_config.crop_size, model_config.depth)
    assert out_size is not None
    if out_size <= 2 * train_config.kappa:
        raise UserInputError(
            f"crop size {train_config.crop_size} leaves {out_size} output pixels, too few for pairs"
            f" within radius {train_config.kappa}",
            "use a larger --crop-size",
        )

    torch.manual_seed(train_config.seed)
    model = UNet(model_config).to(torch_device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.learning_rate)
    step = 0
    if state:
        model.load_state_dict(checkpoint.state_dict)
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])

    per_epoch = math.ceil(
        crops_per_epoch(image, train_config.crop_size, train_config.min_crops_per_epoch)
        / train_config.batch_size
    )
    total_steps = per_epoch * train_config.epochs
    dataset = RandomCrops(
        image,
        train_config.crop_size,
        normalisation,
        train_config.seed,
        length=total_steps * train_config.batch_size,
        elastic=train_config.elastic,
    )
    indices = range(step * train_config.batch_size, total_steps * train_config.batch_size)
    workers = train_config.num_workers if len(indices) else 0
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=train_config.batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        pin_memory=torch_device.type == "cuda",
    )
    log_path = model_path.with_suffix(".loss.csv")
    if not resume or not log_path.exists():
        with log_path.open("w", newline="") as handle:
            csv.writer(handle).writerow(LOG_COLUMNS)
        logged_steps = 0
    else:
        logged_steps = step
    use_amp = torch_device.type == "cuda"

    def save(current_step: int) -> None:
        save_checkpoint(
            Checkpoint(
                kind="oce",
                model_config=model_config,
                normalisation=normalisation,
                state_dict=model.state_dict(),
                data_axes=image.axes,
                train_config=train_config.to_dict(),
                training_state={
                    "optimizer": optimizer.state_dict(),
                    "step": current_step,
                    "total_steps": total_steps,
                    "steps_per_epoch": per_epoch,
                },
            ),
            model_path,
        )

    start = time.perf_counter()
    deadline = start + max_minutes * 60 if max_minutes is not None else math.inf
    waited = 0.0
    final_loss = math.nan
    stopped_early = False
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=None if progress else True, desc="train", unit="step")
    log_handle = log_path.open("a", newline="")
    log = csv.writer(log_handle)
    try:
        iterator = iter(loader)
        while step < total_steps:
            if time.perf_counter() >= deadline:
                stopped_early = True
                break
            fetch_start = time.perf_counter()
            batch = next(iterator)
            fetch_time = time.perf_counter() - fetch_start
            waited += fetch_time
            epoch = step // per_epoch
            lr = learning_rate(train_config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = batch.to(torch_device, non_blocking=True)
            generator = torch.Generator().manual_seed(train_config.seed * 1_000_003 + step)
            with torch.autocast(torch_device.type, dtype=torch.bfloat16, enabled=use_amp):
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
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            final_loss = float(loss.detach())
            if not math.isfinite(final_loss):
                raise UserInputError(
                    "the training loss became NaN or Inf", "check the image for NaN/Inf values"
                )
            log.writerow(
                [
                    step,
                    epoch,
                    f"{final_loss:.6f}",
                    f"{parts['pair']:.6f}",
                    f"{parts['reg']:.4f}",
                    f"{lr:.3g}",
                    f"{time.perf_counter() - start:.2f}",
                    f"{fetch_time:.4f}",
                ]
            )
            bar.set_postfix(loss=f"{final_loss:.4f}", epoch=epoch)
            bar.update()
            if step % per_epoch == 0:
                save(step)
    finally:
        bar.close()
        log_handle.close()
    save(step)
    write_loss_plot(log_path, model_path.with_suffix(".loss.png"))
    seconds = time.perf_counter() - start
    done = step - (logged_steps if resume else 0)
    return TrainResult(
        checkpoint=model_path,
        steps=step,
        total_steps=total_steps,
        final_loss=final_loss,
        seconds=seconds,
        data_wait_fraction=waited / seconds if seconds > 0 and done else 0.0,
        stopped_early=stopped_early,
    )
