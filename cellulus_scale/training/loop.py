"""The training machinery every model shares: settings and resume checks
(:func:`prepare_training`), and the loop with checkpoints, log and plot (:func:`run_training`).

A model brings its :class:`Recipe` (checkpoint kind, presets, settings class, crop check, log
columns), its crops and its loss; :mod:`cellulus_scale.training.oce` (self-supervised OCEs) and
:mod:`cellulus_scale.training.stardist` (supervised refinement) are the two.
"""

from __future__ import annotations

import contextlib
import csv
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cellulus_scale.blockwise.cluster import cpu_count
from cellulus_scale.config import (
    AUTO_PRESET,
    PRESETS,
    ModelConfig,
    Preset,
    TrainConfig,
    auto_preset,
)
from cellulus_scale.errors import UserInputError
from cellulus_scale.io.ome_zarr import OmeImage, check_complete, open_image
from cellulus_scale.kernels.normalisation import Normalisation
from cellulus_scale.model.checkpoint import (
    Checkpoint,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
)
from cellulus_scale.model.device import choose_device
from cellulus_scale.model.unet import UNet
from cellulus_scale.training.crops import crops_per_epoch, estimate_normalisation


@dataclass(frozen=True)
class TrainResult:
    """What a training run did."""

    checkpoint: Path
    steps: int
    total_steps: int
    final_loss: float
    seconds: float
    data_wait_fraction: float  # of the training loop's time, spent waiting for the next batch
    stopped_early: bool


@dataclass(frozen=True)
class Recipe:
    """What a kind of model brings to the shared machinery besides its crops and its loss."""

    kind: str  # the checkpoint kind: "oce" or "stardist"
    presets: dict[str, Preset]
    config_class: type  # TrainConfig or SupervisedConfig
    # refuses unsuitable crops; returns the crop shape per spatial axis, or None for crops of
    # ``crop_size`` on every axis
    check_crop: Callable[[ModelConfig, Any, tuple[int, ...]], tuple[int, ...] | None]
    columns: list[str]  # of the loss log
    ylabel: str  # of the loss plot


@dataclass(frozen=True)
class TrainingOptions:
    """The options of a training run that every model takes (see
    :func:`~cellulus_scale.training.oce.train`)."""

    preset: str = AUTO_PRESET
    axes: str | None = None
    epochs: int | None = None
    max_minutes: float | None = None
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


def open_training_image(
    image_path: str | os.PathLike[str], options: TrainingOptions
) -> tuple[OmeImage, torch.device]:
    """The image to train on (refused if a run left it incomplete) and the torch device."""
    image = open_image(image_path, options.axes)
    check_complete(image.path)
    return image, choose_device(options.device)


def autocast(device: torch.device) -> Any:
    """Forward passes in bfloat16 on a GPU (the loss is computed in float32), float32 on the
    CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Step schedule: x ``lr_gamma`` once each of the ``lr_drops`` fractions of the run's
    ``total_steps`` is done."""
    drops = sum(1 for fraction in config.lr_drops if step >= round(fraction * total_steps))
    return config.learning_rate * config.lr_gamma**drops


def training_finished(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint's training ran its whole (planned) schedule."""
    state = checkpoint.training_state
    planned = state.get("planned_steps", state.get("total_steps"))
    return "step" in state and planned is not None and int(state["step"]) >= int(planned)


#: A run with a time budget times its steps after the first WARMUP_STEPS (loader start-up)
#: for TIMED_STEPS more, then plans its length.
WARMUP_STEPS = 5
TIMED_STEPS = 10


def planned_steps(total_steps: int, step: int, elapsed: float, pace: float, budget: float) -> int:
    """The run's length at ``step``, ``elapsed`` seconds into it, going at ``pace`` seconds a
    step: ``total_steps``, or fewer where the rest would not fit 95% of the ``budget``."""
    if pace <= 0:
        return total_steps
    fits = step + int((0.95 * budget - elapsed) / pace)
    return max(step, min(total_steps, fits))


def resolve_configs(
    preset: str,
    image: OmeImage,
    overrides: dict[str, Any],
    presets: dict[str, Preset] = PRESETS,
) -> tuple[ModelConfig, Any]:
    """The preset's settings, adapted to the image layout, with user overrides applied.

    ``presets``: :data:`PRESETS` (self-supervised) or :data:`SUPERVISED_PRESETS`."""
    if preset not in presets:
        raise UserInputError(f"unknown preset '{preset}'", f"use one of {', '.join(presets)}")
    chosen = presets[preset]
    train_fields_known = type(chosen.train).__dataclass_fields__
    unknown = sorted(
        k
        for k in overrides
        if k not in ModelConfig.__dataclass_fields__ and k not in train_fields_known
    )
    if unknown:
        raise TypeError(f"unknown training setting(s): {', '.join(unknown)}")
    model_fields = {k: v for k, v in overrides.items() if k in ModelConfig.__dataclass_fields__}
    train_fields = {k: v for k, v in overrides.items() if k in train_fields_known}
    layout = {"spatial_dims": image.spatial_dims, "in_channels": image.canonical_shape[1]}
    model_config = replace(chosen.model, **{**layout, **model_fields})
    return model_config, replace(chosen.train, **train_fields)


def write_loss_plot(csv_path: Path, png_path: Path, ylabel: str = "OCE loss") -> None:
    """Plot the loss log (raw and smoothed) to a PNG."""
    from matplotlib.figure import Figure

    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
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
    axis.set_ylabel(ylabel)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path)


# Settings that may change on --resume without changing the result.
_RESUME_FREE = {"num_workers"}


def _resumed_config(
    stored: dict[str, Any], model_path: Path, config_class: type = TrainConfig
) -> Any:
    values = dict(stored)
    for key in ("lr_drops", "normalisation_percentiles", "trusted_size"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    try:
        return config_class(**values)
    except TypeError:
        raise UserInputError(
            f"{model_path}: its training settings are not understood by this version",
            "train a new model with --overwrite",
        ) from None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return isinstance(a, list | tuple) and isinstance(b, list | tuple) and list(a) == list(b)
    return bool(a == b)


def _resume_changes(
    model_config: ModelConfig,
    train_config: Any,
    epochs: int | None,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """The settings a resumed run may change; refuse overrides that would change the result."""
    changes: dict[str, Any] = {} if epochs is None else {"epochs": epochs}
    for key, value in overrides.items():
        if key in _RESUME_FREE:
            changes[key] = value
            continue
        if key in ModelConfig.__dataclass_fields__:
            current = getattr(model_config, key)
        elif key in type(train_config).__dataclass_fields__:
            current = getattr(train_config, key)
        else:
            raise TypeError(f"unknown training setting: {key}")
        if not _same(value, current):
            option = "--" + key.replace("_", "-")
            raise UserInputError(
                f"--resume continues with the checkpoint's settings, but {option} {value} differs"
                f" from its {current}",
                f"drop {option}, or train a new model with --overwrite",
            )
    return changes


def _start_log(log_path: Path, step: int, columns: list[str]) -> None:
    """A fresh loss log, or on resume the old one cut back to the resumed step (a run stopped
    between checkpoints logged steps that are now done again)."""
    rows: list[list[str]] = []
    if step and log_path.exists():
        with log_path.open(newline="") as handle:
            reader = csv.reader(handle)
            if next(reader, None) == columns:
                rows = [r for r in reader if r and r[0].isdigit() and int(r[0]) <= step]
    with log_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


@dataclass
class TrainingSetup:
    """What a training run starts from: settings, normalisation and, on resume, the state."""

    image: OmeImage
    model_config: ModelConfig
    train_config: Any  # TrainConfig or SupervisedConfig
    normalisation: Normalisation
    checkpoint: Checkpoint | None
    state: dict[str, Any]
    crop: int | tuple[int, ...] = 0  # the crop side, or the crop shape per spatial axis


def prepare_training(
    image: OmeImage,
    model_path: Path,
    recipe: Recipe,
    options: TrainingOptions,
    overrides: dict[str, Any],
) -> TrainingSetup:
    """Settings of a new run (preset, overrides, normalisation estimated from the image) or of a
    resumed one (the checkpoint's, of the recipe's kind; only ``epochs`` and ``num_workers`` may
    change); the recipe's ``check_crop`` refuses crops that do not suit the model or the image."""
    kind, presets, config_class = recipe.kind, recipe.presets, recipe.config_class
    check_crop = recipe.check_crop
    preset, epochs, seed = options.preset, options.epochs, options.seed
    resume, overwrite = options.resume, options.overwrite
    spatial_shape = tuple(image.canonical_shape[-image.spatial_dims :])
    checkpoint: Checkpoint | None = None
    if resume:
        if not model_path.exists():
            raise UserInputError(
                f"--resume: no checkpoint at {model_path}", "drop --resume to start"
            )
        checkpoint = load_checkpoint(model_path, kind=kind)
        check_compatible(checkpoint, image.spatial_dims, image.canonical_shape[1], str(image.path))
        model_config = checkpoint.model_config
        state = checkpoint.training_state
        if not {"optimizer", "step"} <= set(state) or not checkpoint.train_config:
            raise UserInputError(
                f"{model_path} holds no training state to resume from",
                "train a new model with --overwrite",
            )
        train_config = _resumed_config(checkpoint.train_config, model_path, config_class)
        changes = _resume_changes(model_config, train_config, epochs, overrides)
        train_config = replace(train_config, **changes)
        normalisation = checkpoint.normalisation
        shape = check_crop(model_config, train_config, spatial_shape)
    else:
        if model_path.exists() and not overwrite:
            raise UserInputError(
                f"{model_path} already exists", "pass --resume to continue it or --overwrite"
            )
        if not model_path.resolve().parent.exists():
            raise UserInputError(f"the folder of {model_path} does not exist", "create it first")
        if epochs is not None:
            overrides["epochs"] = epochs
        overrides["seed"] = seed
        if preset == AUTO_PRESET:
            preset = auto_preset(choose_device(options.device).type)
        model_config, train_config = resolve_configs(preset, image, overrides, presets)
        shape = check_crop(model_config, train_config, spatial_shape)
        normalisation = estimate_normalisation(
            image,
            train_config.crop_size if shape is None else shape,
            train_config.normalisation_samples,
            train_config.normalisation_percentiles,
            train_config.seed,
        )
        state = {}
    workers = train_config.num_workers
    if train_config.epochs < 1 or train_config.batch_size < 1 or (workers or 0) < 0:
        raise UserInputError(
            f"epochs ({train_config.epochs}) and batch size ({train_config.batch_size}) must be at"
            f" least 1 and workers ({train_config.num_workers}) at least 0",
            "pass positive values",
        )
    crop = train_config.crop_size if shape is None else shape
    return TrainingSetup(image, model_config, train_config, normalisation, checkpoint, state, crop)


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader processes: as ``requested``; by default 2 on the CPU (the crops are cheap next
    to a CPU step) and, on a GPU, enough to keep up with it: up to 8, leaving a core free."""
    if requested is not None:
        return requested
    if multiprocessing.current_process().daemon:  # e.g. inside a Dask worker: no children
        return 0
    if device.type != "cuda":
        return 2
    return max(2, min(8, cpu_count() - 1))


@contextlib.contextmanager
def deterministic_kernels(device: torch.device) -> Any:
    """On CUDA, train with deterministic kernels (cuDNN convolutions, gather and scatter), so a
    seed gives the same weights on every run and resuming stays exact; the setting is restored
    afterwards. The CPU kernels used here are deterministic already. Where a torch release has
    no deterministic kernel for an operation (3D max-pool's gradient before torch 2.13) it warns
    instead of failing; the pooling windows here do not overlap, so that one adds up the same."""
    if device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


#: One optimisation step's loss: (model, batch on the device, step) -> (loss, extra log cells).
StepLoss = Callable[[torch.nn.Module, Any, int], tuple[torch.Tensor, list[str]]]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch.to(device, non_blocking=True)


def run_training(
    setup: TrainingSetup,
    model_path: Path,
    recipe: Recipe,
    make_dataset: Callable[[int], torch.utils.data.Dataset],
    step_loss: StepLoss,
    options: TrainingOptions,
    torch_device: torch.device,
    initialise: Callable[[UNet], None] | None = None,
) -> TrainResult:
    """The training loop shared by all models: Adam with the epoch's learning rate, batches from
    ``make_dataset(length)`` taken in index order (so a resumed run sees the same crops), a
    checkpoint of the recipe's kind after every epoch and at the end, a CSV log with the recipe's
    columns (step, epoch, loss, the cells ``step_loss`` returns, lr, seconds, data_wait) and its
    plot. ``initialise`` may adjust a new model's initial weights (not called on resume)."""
    kind, columns, ylabel = recipe.kind, recipe.columns, recipe.ylabel
    max_minutes, resume, progress = options.max_minutes, options.resume, options.progress
    image, model_config, train_config = setup.image, setup.model_config, setup.train_config
    normalisation, state = setup.normalisation, setup.state
    torch.manual_seed(train_config.seed)
    model = UNet(model_config)
    if initialise is not None and not state:
        initialise(model)
    model = model.to(torch_device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.learning_rate)
    step = 0
    final_loss = math.nan
    crops = crops_per_epoch(
        image,
        setup.crop,
        train_config.min_crops_per_epoch,
        train_config.max_crops_per_epoch,
    )
    per_epoch = math.ceil(crops / train_config.batch_size)
    total_steps = per_epoch * train_config.epochs
    planned = total_steps  # the schedule's length: shorter where a time budget asks for it
    if state:
        assert setup.checkpoint is not None
        stored_per_epoch = int(state.get("steps_per_epoch", per_epoch))
        if stored_per_epoch != per_epoch:
            raise UserInputError(
                f"{model_path} was trained with {stored_per_epoch} steps per epoch, but"
                f" {image.path} gives {per_epoch}: it is not the data the model was trained on",
                "resume on the same data, or train a new model with --overwrite",
            )
        model.load_state_dict(setup.checkpoint.state_dict)
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        final_loss = float(state.get("loss", math.nan))
        if options.epochs is None:  # the same run: its planned length and schedule
            planned = min(total_steps, int(state.get("planned_steps", total_steps)))
        if step > total_steps:
            raise UserInputError(
                f"{model_path} has already trained {step} steps ({step / per_epoch:g} epochs),"
                f" more than --epochs {train_config.epochs} asks for",
                f"pass --epochs {math.ceil(step / per_epoch)} or more",
            )
    start_step = step
    dataset = make_dataset(total_steps * train_config.batch_size)
    indices = range(step * train_config.batch_size, total_steps * train_config.batch_size)
    workers = loader_workers(train_config.num_workers, torch_device) if len(indices) else 0
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=train_config.batch_size,
        shuffle=False,
        num_workers=workers,
        # object storage clients are bound to their process's event loop: a forked loader
        # process cannot use its parent's, so it starts afresh
        multiprocessing_context="spawn" if workers and image.path.remote else None,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        pin_memory=torch_device.type == "cuda",
    )
    log_path = model_path.with_suffix(".loss.csv")
    _start_log(log_path, step if resume else 0, columns)

    def save(current_step: int) -> None:
        save_checkpoint(
            Checkpoint(
                kind=kind,
                model_config=model_config,
                normalisation=normalisation,
                state_dict=model.state_dict(),
                data_axes=image.axes,
                train_config=train_config.to_dict(),
                training_state={
                    "optimizer": optimizer.state_dict(),
                    "step": current_step,
                    "total_steps": total_steps,
                    "planned_steps": planned,
                    "steps_per_epoch": per_epoch,
                    "loss": final_loss,
                },
            ),
            model_path,
        )

    start = time.perf_counter()
    # a new run fits its schedule to the budget; a resumed one carries out the plan it recorded
    budget = max_minutes * 60 if max_minutes is not None and not state else math.inf
    deadline = start + budget
    timed_from = step + WARMUP_STEPS if math.isfinite(budget) else None
    plan_at = timed_from + TIMED_STEPS if timed_from is not None else None
    warm = start
    waited = 0.0
    stopped_early = False
    model.train()
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=None if progress else True,
        desc="train",
        unit="step",
    )
    log_handle = log_path.open("a", newline="")
    log = csv.writer(log_handle)
    with deterministic_kernels(torch_device):
        try:
            iterator = iter(loader)
            while step < planned:
                if time.perf_counter() >= deadline:  # the budget ends the run, planned or not
                    stopped_early = step < planned
                    planned = step
                    break
                if step == timed_from:
                    warm = time.perf_counter()
                if step == plan_at:  # the pace is known: fit the whole schedule in the budget
                    now = time.perf_counter()
                    pace = (now - warm) / TIMED_STEPS
                    planned = planned_steps(total_steps, step, now - start, pace, budget)
                    bar.total = planned
                    bar.refresh()
                    save(step)  # the plan is kept at once, for a run interrupted before an epoch
                    if step >= planned:
                        break
                fetch_start = time.perf_counter()
                batch = next(iterator)
                fetch_time = time.perf_counter() - fetch_start
                waited += fetch_time
                epoch = step // per_epoch
                lr = learning_rate(train_config, step, planned)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, cells = step_loss(model, _to_device(batch, torch_device), step)
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
                        *cells,
                        f"{lr:.3g}",
                        f"{time.perf_counter() - start:.2f}",
                        f"{fetch_time:.4f}",
                    ]
                )
                bar.set_postfix(loss=f"{final_loss:.4f}", epoch=epoch)
                bar.update()
                if step % per_epoch == 0:
                    save(step)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what is done, for --resume
            log_handle.flush()
            save(step)
            raise
        finally:
            bar.close()
            log_handle.close()
    loop_seconds = time.perf_counter() - start
    save(step)
    write_loss_plot(log_path, model_path.with_suffix(".loss.png"), ylabel)
    seconds = time.perf_counter() - start
    done = step - start_step
    return TrainResult(
        checkpoint=model_path,
        steps=step,
        total_steps=planned,
        final_loss=final_loss,
        seconds=seconds,
        data_wait_fraction=waited / loop_seconds if loop_seconds > 0 and done else 0.0,
        stopped_early=stopped_early,
    )
