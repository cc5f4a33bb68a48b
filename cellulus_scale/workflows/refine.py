"""Supervised refinement of a finished run (seed, Appendix B): ``cellulus-scale refine OUT.zarr``.

A StarDist model learns from the run's own segmentation (``labels/cellulus``, the
pseudo-labels), leaving out of the loss the objects the teacher is least to be trusted on
(:data:`~cellulus_scale.config.REFINE_HYGIENE`), then segments the run's image copy again,
blockwise on the same kind of cluster, into ``labels/refined`` beside ``labels/cellulus``. The
model is kept as ``OUT.zarr/refined.pt``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellulus_scale.blockwise.plan import LABELS_NAME, WORK_DIR
from cellulus_scale.config import (
    AUTO_PRESET,
    GRID_MIN_DIAMETER,
    REFINE_HYGIENE,
    REFINE_PROB_THRESHOLD,
    SELF_TRAINING_CPU_MINUTES,
    SUPERVISED_PRESETS,
    auto_preset,
)
from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr
from cellulus_scale.io.location import local_store
from cellulus_scale.model.checkpoint import load_checkpoint
from cellulus_scale.model.device import choose_device
from cellulus_scale.model.unet import largest_valid_size_at_most
from cellulus_scale.training.loop import TrainResult, training_finished
from cellulus_scale.workflows.predict import PredictResult, predict

REFINED_LABELS = "refined"
REFINED_MODEL = "refined.pt"


@dataclass(frozen=True)
class RefineResult:
    """What a refinement did: the supervised model's training and the new segmentation."""

    model: Path
    training: TrainResult | None  # None where a resumed refinement reused its finished model
    prediction: PredictResult


def check_refinable(output: Path) -> float:
    """Refuse a store that is not a finished ``predict`` output with ``labels/cellulus``;
    return the object diameter that run used."""
    fix = "run 'cellulus-scale predict IMAGE OUT.zarr' first, then refine OUT.zarr"
    if not output.exists():
        raise UserInputError(f"{output} does not exist", fix)
    status = ome_zarr.run_status(output)
    if status.get("status") == "incomplete":
        raise UserInputError(
            f"{output} is incomplete: its predict run did not finish",
            "finish it with 'predict ... --resume', then refine it",
        )
    if status.get("status") != "complete" or "diameter" not in status:
        raise UserInputError(f"{output} is not a finished predict output", fix)
    if not (output / "labels" / LABELS_NAME).exists():
        raise UserInputError(f"{output} has no labels/{LABELS_NAME} to learn from", fix)
    return float(status["diameter"])


def student_settings(
    output: Path, preset: str, device_type: str, diameter: float
) -> dict[str, int]:
    """What the run asks of the preset's student in 2D: no grid for objects narrower than
    :data:`~cellulus_scale.config.GRID_MIN_DIAMETER` (``{"grid": 1}``), and ``{"crop_size":
    side}`` where the preset's crops are larger than the image (the largest crop the network
    takes that fits): a small video refines as a large one. In 3D nothing:
    :func:`~cellulus_scale.training.stardist.train_supervised` drops the grid and picks the
    crops per axis."""
    image = ome_zarr.open_image(output)
    chosen = SUPERVISED_PRESETS[auto_preset(device_type) if preset == AUTO_PRESET else preset]
    settings: dict[str, int] = {}
    depth, grid = chosen.model.depth, chosen.model.grid
    if image.spatial_dims == 3:
        return settings
    if grid > 1 and diameter < GRID_MIN_DIAMETER:
        settings["grid"] = grid = 1
    side = min(image.canonical_shape[-image.spatial_dims :])
    if chosen.train.crop_size > side:
        fits = largest_valid_size_at_most(side, depth, grid=grid)
        if fits is not None:
            settings["crop_size"] = fits
    return settings


def refine(
    output_path: str | os.PathLike[str],
    preset: str = AUTO_PRESET,
    train_minutes: float | None = None,
    epochs: int | None = None,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    prob_threshold: float = REFINE_PROB_THRESHOLD,
    **predict_options: Any,
) -> RefineResult:
    """Train a StarDist model on the run ``output_path``'s own labels (``labels/cellulus``),
    trusted objects only, and segment its image into ``labels/refined``; keep the model as
    ``OUT.zarr/refined.pt``.

    Training uses ``preset`` (``auto``: the paper's where a GPU trains, the cpu preset elsewhere)
    for ``epochs`` (the preset's by default) within ``train_minutes`` (by default
    :data:`~cellulus_scale.config.SELF_TRAINING_CPU_MINUTES` on a CPU, the whole schedule on a
    GPU). ``resume`` continues an interrupted refinement (training, then prediction). The
    student's objects are its candidates above ``prob_threshold``
    (:data:`~cellulus_scale.config.REFINE_PROB_THRESHOLD`); ``predict_options`` go to
    :func:`~cellulus_scale.workflows.predict.predict` (the cluster: ``workers``, ``scheduler``,
    ``client``; ``nms_threshold``)."""
    from cellulus_scale.training.stardist import train_supervised

    output = local_store(output_path, "refine")
    diameter = check_refinable(output)
    model = output / REFINED_MODEL
    work = output / "labels" / WORK_DIR
    if not resume:
        ome_zarr.check_labels_writable(output, REFINED_LABELS, overwrite)
    device_type = choose_device(device).type
    if train_minutes is None and device_type == "cpu":
        train_minutes = SELF_TRAINING_CPU_MINUTES
    continuing = resume and model.exists()
    overrides = (
        {}
        if continuing
        else {**REFINE_HYGIENE, **student_settings(output, preset, device_type, diameter)}
    )
    training = None
    if not (continuing and training_finished(load_checkpoint(model, kind="stardist"))):
        training = train_supervised(
            output,
            model,
            labels=None if continuing else LABELS_NAME,
            preset=preset,
            epochs=epochs,
            max_minutes=train_minutes,
            device=device,
            seed=seed,
            resume=continuing,
            overwrite=not continuing,
            progress=progress,
            **overrides,
        )
    prediction = predict(
        output,
        None,
        model,
        diameter=diameter,
        device=device,
        seed=seed,
        overwrite=overwrite,
        resume=resume and work.exists(),
        progress=progress,
        into_input=True,
        labels_name=REFINED_LABELS,
        prob_threshold=prob_threshold,
        **predict_options,
    )
    return RefineResult(model, training, prediction)
