"""Blockwise prediction on Dask (``cellulus-scale predict``).

:func:`predict` opens the input, picks the method (``--method``, or for ``cellulus`` the kind
of the checkpoint: :mod:`~cellulus_scale.methods.oce` for a self-supervised model,
:mod:`~cellulus_scale.methods.stardist` for a supervised one; ``watershed`` is
:mod:`~cellulus_scale.methods.watershed`), checks the inputs against each other, plans the
run, and lets the blockwise engine (:mod:`cellulus_scale.blockwise.engine`) run the method's
stages; then it finishes the output.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cellulus_scale.blockwise.engine import RunOptions, run_session
from cellulus_scale.blockwise.plan import Plan, make_plan
from cellulus_scale.blockwise.store import FeatureImage, finish_output
from cellulus_scale.config import SegmentationConfig, default_of
from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr
from cellulus_scale.methods import oce, stardist, watershed
from cellulus_scale.methods.base import Method, MethodSettings, Statistics
from cellulus_scale.model.checkpoint import Checkpoint, check_compatible, load_checkpoint
from cellulus_scale.model.device import choose_device
from cellulus_scale.model.unet import context

#: The methods of a checkpoint's kind (``--method cellulus``).
MODEL_METHODS: dict[str, Method] = {"oce": oce.METHOD, "stardist": stardist.METHOD}


@dataclass(frozen=True)
class PredictResult:
    """What a prediction run did."""

    output: Path
    objects: int
    statistics: Statistics
    blocks: int
    recomputed: dict[str, int]  # per stage, the blocks computed rather than found recorded
    seconds: dict[str, float]  # per part of the run


def predict(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    model_path: str | os.PathLike[str] | None,
    diameter: float,
    method: str = "cellulus",
    block_size: int | None = None,
    tta: int = default_of(SegmentationConfig, "tta_passes"),
    mode: str = default_of(SegmentationConfig, "mode"),
    threshold: float | None = None,
    min_contrast: float | None = default_of(SegmentationConfig, "min_contrast"),
    clustering: str = default_of(SegmentationConfig, "clustering"),
    precision: str = default_of(SegmentationConfig, "precision"),
    scheduler: str | None = None,
    workers: int | None = None,
    save_embeddings: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    axes: str | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    client: Any = None,
    prob_threshold: float = default_of(SegmentationConfig, "prob_threshold"),
    nms_threshold: float = default_of(SegmentationConfig, "nms_threshold"),
    scheduler_file: str | os.PathLike[str] | None = None,
    tls_ca_file: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    slurm: str | os.PathLike[str] | None = None,
) -> PredictResult:
    """Segment every frame of an OME-Zarr image blockwise on Dask; write ``out.zarr`` with a
    copy of the image and the instance labels ``labels/cellulus`` (NGFF 0.4).

    The cluster: ``client`` if given; else the scheduler at ``scheduler`` or named by
    ``scheduler_file`` (a ``tls://`` one with the PEM files ``tls_ca_file``, ``tls_cert`` and
    ``tls_key``); else, with ``slurm`` (a ``cluster.yaml``), SLURM jobs submitted for the run;
    else a local cluster of ``workers`` processes."""
    from cellulus_scale.blockwise.cluster import connection_options

    connection = connection_options(
        scheduler, scheduler_file, tls_ca_file, tls_cert, tls_key, slurm
    )
    image = ome_zarr.open_image(input_path, axes)
    ome_zarr.check_complete(image.path)
    if device == "cuda":
        choose_device(device)  # refuses where no CUDA GPU is available
    segmentation = SegmentationConfig(
        diameter=diameter,
        tta_passes=tta,
        mode=mode,
        threshold=threshold,
        min_contrast=min_contrast,
        clustering=clustering,
        precision=precision,
        seed=seed,
        prob_threshold=prob_threshold,
        nms_threshold=nms_threshold,
    )
    options = RunOptions(scheduler, workers, client, overwrite, resume, progress, **connection)
    chosen, checkpoint = choose_method(method, model_path)
    settings = method_settings(image, model_path, segmentation, checkpoint)
    depth = checkpoint.model_config.depth if checkpoint is not None else 0
    size = choose_block_size(block_size, image.spatial_dims, depth, diameter)
    plan = make_plan(image, output_path, size, device, chosen.name, settings)
    if not resume:
        ome_zarr.check_output_path(plan.output_path, overwrite, inputs=[image.path])
    features = chosen.features(plan, save_embeddings)
    return run_method(chosen, plan, image, checkpoint, features, options)


def choose_method(
    method: str, model_path: str | os.PathLike[str] | None
) -> tuple[Method, Checkpoint | None]:
    """The method of ``--method`` and, for ``cellulus``, of the checkpoint's kind; and the
    checkpoint (None for the watershed baseline)."""
    if method not in ("cellulus", "watershed"):
        raise UserInputError(f"unknown method '{method}'", "use cellulus or watershed")
    if method == "watershed":
        return watershed.METHOD, None
    if model_path is None:
        raise UserInputError("--model is missing", "pass --model MODEL.pt from 'train'")
    checkpoint = load_checkpoint(model_path)
    if checkpoint.kind not in MODEL_METHODS:
        load_checkpoint(model_path, kind="oce")  # refuses, naming the kind
    return MODEL_METHODS[checkpoint.kind], checkpoint


def method_settings(
    image: ome_zarr.OmeImage,
    model_path: str | os.PathLike[str] | None,
    segmentation: SegmentationConfig,
    checkpoint: Checkpoint | None,
) -> MethodSettings:
    """The settings the plan carries for the method, once the model suits the image and the
    diameter the frame."""
    if checkpoint is not None:
        check_compatible(checkpoint, image.spatial_dims, image.canonical_shape[1], str(image.path))
    spatial = image.canonical_shape[-image.spatial_dims :]
    if segmentation.diameter > min(spatial):
        raise UserInputError(
            f"--diameter {segmentation.diameter:g} is larger than the frame"
            f" ({'x'.join(map(str, spatial))})",
            "give the typical object diameter in pixels",
        )
    return MethodSettings(
        segmentation=segmentation,
        model_path=str(Path(model_path).resolve()) if model_path is not None else "",
        network_context=context(checkpoint.model_config.depth) if checkpoint is not None else 0,
    )


def run_method(
    method: Method,
    plan: Plan,
    image: ome_zarr.OmeImage,
    checkpoint: Checkpoint | None,
    features: tuple[FeatureImage, ...],
    options: RunOptions,
) -> PredictResult:
    """Run the method's stages in a session of the engine, then finish the output (pyramids,
    metadata, status complete) once the cluster is closed."""
    with run_session(plan, image, options, features, method.network) as session:
        result = method.run(session, checkpoint)
    start = time.perf_counter()
    finish_output(
        session.plan,
        image,
        session.root,
        features,
        objects=result.objects,
        statistics=asdict(result.statistics),
    )
    session.timings["writing"] = time.perf_counter() - start
    return PredictResult(
        Path(plan.output_path),
        result.objects,
        result.statistics,
        len(plan.work),
        session.recomputed,
        session.timings,
    )


# --- block size ------------------------------------------------------------------------------


def default_block_size(spatial_dims: int) -> int:
    """256 px blocks in 2D, 64 voxels in 3D: a few hundred MB per worker for the paper's model."""
    return 256 if spatial_dims == 2 else 64


def _smallest(depth: int, diameter: float) -> tuple[int, int]:
    """(pooling step, smallest block size the halos allow) of a depth-``depth`` network."""
    step = 2**depth
    return step, max(2 * context(depth), int(math.ceil(diameter)), step)


def smallest_block_size(depth: int, diameter: float) -> int:
    """The smallest block the halos and the depth-``depth`` pooling grid allow."""
    step, minimum = _smallest(depth, diameter)
    return math.ceil(minimum / step) * step


def check_block_size(block_size: int, depth: int, diameter: float) -> None:
    """Refuse blocks the halos or the network's pooling grid cannot work with."""
    step, minimum = _smallest(depth, diameter)
    if block_size < minimum:
        raise UserInputError(
            f"block size {block_size} is smaller than the halos allow (network context "
            f"{context(depth)} px per side, object diameter {diameter:g} px)",
            f"use --block-size {math.ceil(minimum / step) * step} or more",
        )
    if block_size % step:
        lower, upper = block_size // step * step, (block_size // step + 1) * step
        raise UserInputError(
            f"block size {block_size} is not a multiple of {step}, the depth-{depth} network's"
            " pooling grid",
            f"use --block-size {lower} or {upper}",
        )


def choose_block_size(
    block_size: int | None, spatial_dims: int, depth: int, diameter: float
) -> int:
    """``block_size``, checked; by default 256 (2D) or 64 (3D), grown where a deep network (of
    depth ``depth``, 0 without one) or the diameter needs larger blocks."""
    if block_size is None:
        size = max(default_block_size(spatial_dims), smallest_block_size(depth, diameter))
    else:
        size = block_size
    check_block_size(size, depth, diameter)
    return size
