"""Blockwise prediction on Dask (``cellulus-scale predict``).

:func:`predict` opens the input, picks the method (``--method``, or for ``cellulus`` the kind
of the checkpoint: :mod:`~cellulus_scale.methods.oce` for a self-supervised model,
:mod:`~cellulus_scale.methods.stardist` for a supervised one; ``watershed`` is
:mod:`~cellulus_scale.methods.watershed`), checks the inputs against each other, plans the
run, and lets the blockwise engine (:mod:`cellulus_scale.blockwise.engine`) run the method's
stages; then it finishes the output.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cellulus_scale.blockwise.engine import RunOptions, Session, run_session
from cellulus_scale.blockwise.plan import Plan, make_plan
from cellulus_scale.blockwise.store import LABELS_NAME, WORK_DIR, FeatureImage, finish_output
from cellulus_scale.config import (
    AUTO_PRESET,
    PRESETS,
    SELF_TRAINING_CPU_MINUTES,
    SMALLEST_RESOLVED_DIAMETER,
    ModelConfig,
    Preset,
    SegmentationConfig,
    TrackingConfig,
    auto_preset,
    default_of,
)
from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr
from cellulus_scale.io.location import Location, read_only_url
from cellulus_scale.methods import oce, stardist, watershed
from cellulus_scale.methods.base import Method, MethodSettings, Statistics
from cellulus_scale.model.checkpoint import Checkpoint, check_compatible, load_checkpoint
from cellulus_scale.model.device import choose_device
from cellulus_scale.model.unet import axis_flat_levels, context, contexts, pooling_step
from cellulus_scale.tracking.stages import LinkSettings, finish_tracks, run_linking
from cellulus_scale.training.loop import TrainResult, training_finished
from cellulus_scale.training.oce import check_trainable, largest_crop_within, train
from cellulus_scale.workflows.diameter import estimate_diameter
from cellulus_scale.workflows.link import link_settings

#: The model a run trained on its input, kept in the output store.
MODEL_FILE = "model.pt"

#: How far (relative) the voxel size of an image may differ from the one a model was trained on.
SPACING_TOLERANCE = 0.05

#: The methods of a checkpoint's kind (``--method cellulus``).
MODEL_METHODS: dict[str, Method] = {"oce": oce.METHOD, "stardist": stardist.METHOD}


@dataclass(frozen=True)
class PredictResult:
    """What a prediction run did."""

    output: Path | Location  # a local path, or the URL in object storage
    objects: int
    statistics: Statistics
    blocks: int
    recomputed: dict[str, int]  # per stage, the blocks computed rather than found recorded
    seconds: dict[str, float]  # per part of the run
    tracks: dict[str, Any] | None = None  # with link: the counts of the linking


def predict(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None,
    model_path: str | os.PathLike[str] | None = None,
    diameter: float | None = None,
    method: str = "cellulus",
    block_size: int | Sequence[int] | None = None,
    tta: int = default_of(SegmentationConfig, "tta_passes"),
    mode: str = default_of(SegmentationConfig, "mode"),
    nucleus_threshold: str = default_of(SegmentationConfig, "nucleus_threshold"),
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
    train_minutes: float | None = None,
    preset: str = AUTO_PRESET,
    train_epochs: int | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    tls_ca_file: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    slurm: str | os.PathLike[str] | None = None,
    link: bool = False,
    max_gap: int = default_of(TrackingConfig, "max_gap"),
    max_distance: float | None = None,
    voxel_size: Sequence[float] | None = None,
    into_input: bool = False,
    labels_name: str = LABELS_NAME,
    ngff_version: str | None = None,
    diameter_unit: str | None = None,
    std_threshold: str = default_of(SegmentationConfig, "std_threshold"),
) -> PredictResult:
    """Segment every frame of an OME-Zarr image blockwise on Dask; write ``out.zarr`` with a
    copy of the image and the instance labels ``labels/cellulus`` (NGFF 0.4). With ``link``,
    also link the objects over time in the same run (:func:`~cellulus_scale.workflows.link.link`:
    ``labels/tracks``, its track table and ``tracks.geff``).

    Without ``model_path`` a model is first trained on the input itself (``preset``, for
    ``train_epochs``, by default the preset's, within ``train_minutes``, by default
    :data:`~cellulus_scale.config.SELF_TRAINING_CPU_MINUTES` on a CPU and the preset's whole
    schedule on a GPU) and kept as ``OUT.zarr/model.pt``. Without ``diameter`` the typical
    object diameter is estimated from the image
    (:func:`~cellulus_scale.workflows.diameter.estimate_diameter`). Both are recorded in the
    output's metadata. ``diameter`` is in in-plane pixels, or in ``diameter_unit`` (an NGFF
    space unit such as "micrometer", converted with the image's x pixel size).

    The cluster: ``client`` if given; else the scheduler at ``scheduler`` or named by
    ``scheduler_file`` (a ``tls://`` one with the PEM files ``tls_ca_file``, ``tls_cert`` and
    ``tls_key``); else, with ``slurm`` (a ``cluster.yaml``), SLURM jobs submitted for the run;
    else a local cluster of ``workers`` processes.

    3D images: the voxel size comes from the NGFF ``scale`` (``voxel_size`` Z,Y,X overrides
    it); the diameter is in in-plane pixels, and embeddings, the mean-shift bandwidth, distances
    and the minimum size are physical (z scaled by the z step).

    ``block_size``: one block side for every spatial axis, or one per axis (Z,Y,X or Y,X; e.g.
    thin blocks in z for a stack of widely spaced planes); by default 256 (2D) or 64 (3D), see
    :func:`choose_block_size`.

    With ``into_input`` (and ``output_path`` None) the labels are written into the input's own
    ``labels`` group (``IN.zarr/labels/cellulus``, in the input's NGFF version), with no copy of
    the image; nothing else of the input is written to. ``labels_name`` names the labels
    (``labels/<labels_name>``; ``refined`` for :func:`~cellulus_scale.workflows.refine.refine`).
    ``ngff_version`` is a new output's NGFF version (default
    :data:`~cellulus_scale.config.NGFF_VERSION`; ``"0.5"``: zarr v3, one shard per block and
    frame)."""
    from cellulus_scale.blockwise.cluster import connection_options

    output_path = output_of(input_path, output_path, into_input, link, save_embeddings)
    connection = connection_options(
        scheduler, scheduler_file, tls_ca_file, tls_cert, tls_key, slurm
    )
    image = ome_zarr.open_image(input_path, axes)
    ome_zarr.check_complete(image.path)
    version = ome_zarr.output_ngff_version(image, ngff_version, into_input)
    if device == "cuda":
        choose_device(device)  # refuses where no CUDA GPU is available
    linking = link_settings(labels_name, max_gap, max_distance) if link else None
    output = Location.of(output_path)
    if output.remote:
        check_remote_output(output, model_path, method, link)
    if into_input and not resume:
        ome_zarr.check_labels_writable(image.path, labels_name, overwrite)
    elif not resume:
        ome_zarr.check_output_path(output_path, overwrite, inputs=[image.path])
    elif output.exists() and not into_input:
        recorded = ome_zarr.run_status(output_path).get("link")
        if recorded != (linking.to_json() if linking else None):
            raise UserInputError(
                f"--resume: the linking options differ from those of the interrupted run in"
                f" {output_path}",
                "rerun with the same --link options, or start again with --overwrite",
            )
    ome_zarr.check_sample_finite(image)  # before anything is written
    spacing = ome_zarr.voxel_spacing(image, voxel_size)
    self_training = None
    if model_path is None and method == "cellulus":
        for choice in PRESETS.values() if preset == AUTO_PRESET else (PRESETS[preset],):
            check_trainable(image, choice, voxel_size)  # refuses before anything starts
        work = output.path.resolve() / ("labels" if into_input else "") / WORK_DIR
        self_training = SelfTraining(
            work / MODEL_FILE,
            preset,
            train_minutes,
            train_epochs,
            device,
            seed,
            axes,
            tuple(voxel_size) if voxel_size is not None else None,
        )
        model_path = self_training.model_path
    if diameter_unit is not None:
        if diameter is None:
            raise UserInputError(
                "--diameter-unit needs --diameter", "give --diameter D with its unit, e.g. 8"
            )
        diameter = ome_zarr.diameter_in_pixels(image, diameter, diameter_unit, voxel_size)
        _say(progress, f"object diameter: {diameter:.1f} px")
    estimated = diameter is None
    if diameter is None:
        found = estimate_diameter(input_path, axes, spacing)
        diameter = found.diameter
        _say(
            progress,
            f"estimated object diameter: {diameter:.1f} px ({found.objects} objects in"
            f" {found.frames} frames)",
        )
    segmentation = SegmentationConfig(
        diameter=diameter,
        tta_passes=tta,
        mode=mode,
        nucleus_threshold=nucleus_threshold,
        threshold=threshold,
        std_threshold=std_threshold,
        min_contrast=min_contrast,
        clustering=clustering,
        precision=precision,
        seed=seed,
        prob_threshold=prob_threshold,
        nms_threshold=nms_threshold,
    )
    warning = small_object_warning(segmentation.diameter) if method == "cellulus" else None
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    options = RunOptions(scheduler, workers, client, overwrite, resume, progress, **connection)
    if self_training is not None:
        chosen, checkpoint = oce.METHOD, None
        preset_model = PRESETS["paper" if preset == AUTO_PRESET else preset].model
        depth = preset_model.depth
        # the model trained here: the preset's, for this image's layout and voxel size
        network = replace(
            preset_model,
            spatial_dims=image.spatial_dims,
            in_channels=image.canonical_shape[1],
            spacing=spacing,
        )
    else:
        chosen, checkpoint = choose_method(method, model_path)
        depth = checkpoint.model_config.depth if checkpoint is not None else 0
        network = checkpoint.model_config if checkpoint is not None else None
    settings = method_settings(image, model_path, segmentation, checkpoint, depth, network, spacing)
    size = choose_block_size(
        block_size, image.spatial_dims, depth, diameter, network, settings.voxel_size
    )
    plan = make_plan(
        image, output_path, size, device, chosen.name, settings, into_input, labels_name, version
    )
    features = chosen.features(plan, save_embeddings)
    details = {"diameter": diameter, "diameter_estimated": estimated}
    return run_method(
        chosen, plan, image, checkpoint, features, options, self_training, details, linking
    )


def check_remote_output(
    output: Location, model_path: str | os.PathLike[str] | None, method: str, link: bool
) -> None:
    """Refuse what an output in object storage cannot hold (yet): a URL that can only be read,
    a model trained into it while the run goes on, and the linking's local tables."""
    if read_only_url(output):
        raise UserInputError(
            f"{output} can only be read",
            "write the output to s3:// (or another writable object store) or to a local folder",
        )
    if model_path is None and method == "cellulus":
        raise UserInputError(
            f"training on the input keeps the model in the output, which {output} in object"
            " storage cannot hold while it trains",
            "train first (cellulus-scale train IMAGE MODEL.pt), then predict with --model MODEL.pt",
        )
    if link:
        raise UserInputError(
            f"--link keeps local tables beside the labels, which {output} cannot hold",
            "predict into a local output for --link, or link a local copy afterwards",
        )


def model_location(model_path: str | os.PathLike[str] | None) -> str:
    """The model as every worker finds it: an absolute local path (on a shared file system),
    or a URL; "" for none."""
    if model_path is None:
        return ""
    location = Location.of(model_path)
    return location.url if location.remote else str(location.path.resolve())


def small_object_warning(diameter: float) -> str | None:
    """A one-line warning where objects of ``diameter`` pixels are too small for the model to
    segment well (README, "Object sizes"), naming the fix; None where they are not."""
    if diameter >= SMALLEST_RESOLVED_DIAMETER:
        return None
    factor = math.ceil(SMALLEST_RESOLVED_DIAMETER / diameter)
    return (
        f"warning: objects of {diameter:.1f} px are smaller than the model resolves well"
        f" ({SMALLEST_RESOLVED_DIAMETER:g} px); resample the image {factor}x larger in y and x"
        " first (expect many merged or missed objects otherwise)"
    )


def output_of(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None,
    into_input: bool,
    link: bool,
    save_embeddings: bool,
) -> str | os.PathLike[str]:
    """The output store: ``output_path``, or the input itself with ``into_input``."""
    if not into_input:
        if output_path is None:
            raise UserInputError(
                "OUTPUT is missing",
                "name a new output store (predict IMAGE OUTPUT), or pass --into-input to write"
                " the labels into IMAGE's own labels group",
            )
        return output_path
    if output_path is not None:
        raise UserInputError(
            "--into-input writes into IMAGE itself, but an OUTPUT was named too",
            "drop OUTPUT, or drop --into-input",
        )
    for flag, given in (("--link", link), ("--save-embeddings", save_embeddings)):
        if given:
            raise UserInputError(
                f"{flag} writes beside the labels, which --into-input does not allow",
                f"drop {flag}, or write a new output: predict IMAGE OUTPUT",
            )
    return input_path


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
    depth: int,
    network: ModelConfig | None = None,
    spacing: tuple[float, ...] | None = None,
) -> MethodSettings:
    """The settings the plan carries for the method (a network of ``depth``, 0 without one,
    described by ``network`` where known), once the model suits the image and the diameter the
    frame. An anisotropic OCE model (one with a voxel size) must have been trained for the
    image's voxel size ``spacing``: its offsets are in those units."""
    if checkpoint is not None:
        check_compatible(checkpoint, image.spatial_dims, image.canonical_shape[1], str(image.path))
    spatial = image.canonical_shape[-image.spatial_dims :]
    trained = network.spacing if network is not None else None
    if trained is not None and (
        spacing is None
        or any(abs(a / b - 1.0) > SPACING_TOLERANCE for a, b in zip(trained, spacing, strict=True))
    ):
        given = "isotropic" if spacing is None else "x".join(f"{v:g}" for v in spacing)
        raise UserInputError(
            f"the model was trained on voxels of {'x'.join(f'{v:g}' for v in trained)} (z,y,x in"
            f" pixels), but {image.path} has {given}",
            "pass --voxel-size Z,Y,X if the image's scale is wrong, or train a model on it",
        )
    # the diameter is in-plane: a stack may be thinner than its nuclei are wide (a few planes
    # through flat, adherent cells), so only the in-plane sides bound it
    if segmentation.diameter > min(spatial[-2:]):
        raise UserInputError(
            f"--diameter {segmentation.diameter:g} is larger than the frame"
            f" ({'x'.join(map(str, spatial))})",
            "give the typical object diameter in pixels",
        )
    halos = contexts(network) if network is not None and model_path is not None else None
    return MethodSettings(
        segmentation=segmentation,
        model_path=model_location(model_path),
        network_context=max(halos) if halos is not None else 0,
        network_halos=halos if halos is not None and len(set(halos)) > 1 else None,
        spacing=trained,
        voxel_size=spacing,
    )


@dataclass(frozen=True)
class SelfTraining:
    """Training on the input itself before predicting: where the model is kept during the run,
    and how it is trained."""

    model_path: Path
    preset: str
    minutes: float | None
    epochs: int | None
    device: str
    seed: int
    axes: str | None
    voxel_size: tuple[float, ...] | None = None


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def trainable_crop(image: ome_zarr.OmeImage, preset: Preset) -> int:
    """The largest training crop that fits the image, for the preset's network; refuses an
    image too small to train on."""
    spatial = image.canonical_shape[-image.spatial_dims :]
    fits = largest_crop_within(min(spatial), preset.model.depth, preset.train.kappa)
    if fits is None:
        raise UserInputError(
            f"{image.path} ({'x'.join(map(str, spatial))}) is too small to train a model on",
            "pass --model MODEL.pt, trained with 'cellulus-scale train' on larger images",
        )
    return fits


def train_here(
    image_path: str, model_path: Path, minutes: float | None, device: str, **options: Any
) -> TrainResult:
    """Train where this runs (a worker, or this process): within ``minutes``, by default
    :data:`~cellulus_scale.config.SELF_TRAINING_CPU_MINUTES` where the training device is a CPU
    and the preset's whole schedule on a GPU."""
    kind = choose_device(device).type
    if minutes is None and kind != "cuda":
        minutes = SELF_TRAINING_CPU_MINUTES
    preset = options.pop("preset")
    preset = auto_preset(kind) if preset == AUTO_PRESET else preset
    chosen = PRESETS[preset]
    image = ome_zarr.open_image(image_path, options.get("axes"))
    if image.spatial_dims == 2:
        options["crop_size"] = min(chosen.train.crop_size, trainable_crop(image, chosen))
    # 3D: train chooses the crop (in-plane side and planes) from the image and its voxel size
    return train(
        image_path,
        model_path,
        preset=preset,
        max_minutes=minutes,
        device=device,
        overwrite=True,
        **options,
    )


def train_on_input(session: Session, training: SelfTraining, resume: bool) -> Checkpoint:
    """Train (or, on resume, continue or reuse) the model on the session's input: in this
    process on the embedded cluster, else as one task on a worker of the cluster (a GPU worker
    where there is one), which writes the model through the shared file system."""
    from cellulus_scale.blockwise.cluster import network_resources

    path = training.model_path
    if resume and path.exists() and training_finished(load_checkpoint(path, kind="oce")):
        _say(session.progress, f"reusing the model trained before: {path}")
        return load_checkpoint(path, kind="oce")
    path.parent.mkdir(parents=True, exist_ok=True)
    arguments = dict(
        preset=training.preset,
        axes=training.axes,
        minutes=training.minutes,
        epochs=training.epochs,
        device=training.device,
        seed=training.seed,
        voxel_size=training.voxel_size,
        resume=resume and path.exists(),
        progress=session.progress and session.local,
    )
    budget = f"up to {training.minutes:g} min" if training.minutes is not None else "default budget"
    _say(session.progress, f"training on the input ({budget}) -> {path}")
    with session.timed("training"):
        if session.local:
            result = train_here(session.plan.input_path, path, **arguments)
        else:
            resources = network_resources(session.client, training.device)
            future = session.client.submit(
                train_here,
                session.plan.input_path,
                path,
                pure=False,
                resources=resources,
                **arguments,
            )
            result = future.result()
    _say(session.progress, f"trained {result.steps} steps, loss {result.final_loss:.4f}")
    return load_checkpoint(path, kind="oce")


def run_method(
    method: Method,
    plan: Plan,
    image: ome_zarr.OmeImage,
    checkpoint: Checkpoint | None,
    features: tuple[FeatureImage, ...],
    options: RunOptions,
    self_training: SelfTraining | None = None,
    details: dict[str, Any] | None = None,
    linking: LinkSettings | None = None,
) -> PredictResult:
    """Run the method's stages in a session of the engine (after training the model on the
    input where ``self_training`` asks for it), then, with ``linking``, the linking stages on
    the labels written; then finish the output (pyramids, metadata, tracks, status complete)
    once the cluster is closed."""
    details = dict(details or {})
    linked = None
    with run_session(plan, image, options, features, method.network) as session:
        try:
            if linking is not None:
                session.record(link=linking.to_json())
            if self_training is not None:
                checkpoint = train_on_input(session, self_training, options.resume)
                check_compatible(
                    checkpoint, image.spatial_dims, image.canonical_shape[1], str(image.path)
                )
            result = method.run(session, checkpoint)
            if linking is not None:
                linked = run_linking(session, linking, session.plan.settings.voxel_size)
        except UserInputError as error:  # bad input met by a task: say so in the output
            stopped_on(session, error)
            raise
    start = time.perf_counter()
    if self_training is not None:
        kept = plan.output.path / ("labels/" + plan.labels_name if plan.into_input else "")
        details["model"] = str(keep_model(self_training.model_path, kept))
    finishing = None
    if linked is not None:
        details["tracks"] = linked.summary()
        label_space = ome_zarr.label_space(image)

        def finishing() -> None:
            begun = time.perf_counter()
            finish_tracks(session.root, session.plan, linking, linked, label_space)
            session.timings["tracks output"] = time.perf_counter() - begun

    try:
        finish_output(
            session.plan,
            image,
            session.root,
            features,
            finishing,
            objects=result.objects,
            statistics=asdict(result.statistics),
            **details,
        )
    except OSError as error:  # e.g. a full disk met by the pyramids: every block is recorded
        if error.errno is None:
            raise
        raise UserInputError(
            f"{error.strerror} in the output {plan.output_path} (finishing it)",
            "free space or make it writable, then rerun the same command with --resume",
        ) from None
    session.timings["writing"] = (
        time.perf_counter() - start - session.timings.get("tracks output", 0.0)
    )
    return PredictResult(
        plan.output if plan.output.remote else plan.output.path,
        result.objects,
        result.statistics,
        len(plan.work),
        session.recomputed,
        session.timings,
        linked.summary() if linked is not None else None,
    )


def stopped_on(session: Session, error: UserInputError) -> None:
    """A problem of the input or the output stopped the run: the output records it, so that the
    next command says to fix it and finish with --resume (or start again with --overwrite).
    Where even that cannot be written (a full disk), the error is reported all the same."""
    with contextlib.suppress(OSError):
        session.record(stopped=error.problem)


def keep_model(model_path: Path, output: Path) -> Path:
    """Move a model trained during the run (with its loss log and plot) from the run's working
    folder to ``OUT.zarr/model.pt``, where it stays for reuse with ``--model``."""
    kept = output / MODEL_FILE
    for suffix in (".pt", ".loss.csv", ".loss.png"):
        source = model_path.with_suffix(suffix)
        if source.exists():
            os.replace(source, kept.with_suffix(suffix))
    return kept


# --- block size ------------------------------------------------------------------------------


def default_block_size(spatial_dims: int) -> int:
    """256 px blocks in 2D, 64 voxels in 3D: a few hundred MB per worker for the paper's model."""
    return 256 if spatial_dims == 2 else 64


@dataclass(frozen=True)
class AxisLimits:
    """What one spatial axis asks of a block side: a multiple of ``step`` (the network's pooling
    grid along it) and at least ``minimum`` (twice the network's context, one diameter)."""

    name: str
    step: int
    minimum: int
    context: int

    @property
    def smallest(self) -> int:
        return math.ceil(self.minimum / self.step) * self.step


def axis_limits(
    spatial_dims: int,
    depth: int,
    diameter: float,
    network: ModelConfig | None = None,
    voxel_size: Sequence[float] | None = None,
) -> list[AxisLimits]:
    """Per spatial axis, the pooling step and the smallest side the halos allow: the z axis of
    an anisotropic model pools only below its flat levels and needs fewer planes for a diameter
    (``voxel_size``: the voxel size in in-plane pixels)."""
    flats = axis_flat_levels(network) if network is not None else (0,) * spatial_dims
    grid = network.grid if network is not None else 1
    limits = []
    for axis, name in enumerate("zyx"[-spatial_dims:]):
        extent = diameter / (float(voxel_size[axis]) if voxel_size is not None else 1.0)
        halo = context(depth, flats[axis], grid)
        step = pooling_step(depth, flats[axis], grid)
        minimum = max(2 * halo, int(math.ceil(extent - 1e-9)), step)
        limits.append(AxisLimits(name, step, minimum, halo))
    return limits


def check_block_size(size: int, limit: AxisLimits, depth: int, diameter: float) -> None:
    """Refuse a block side the halos or the network's pooling grid cannot work with."""
    if size < limit.minimum:
        raise UserInputError(
            f"block size {size} along {limit.name} is smaller than the halos allow (network"
            f" context {limit.context} px per side, object diameter {diameter:g} px)",
            f"use --block-size {limit.smallest} or more along {limit.name}",
        )
    if size % limit.step:
        lower, upper = size // limit.step * limit.step, (size // limit.step + 1) * limit.step
        raise UserInputError(
            f"block size {size} along {limit.name} is not a multiple of {limit.step}, the"
            f" depth-{depth} network's pooling grid",
            f"use --block-size {lower} or {upper} along {limit.name}",
        )


def choose_block_size(
    block_size: int | Sequence[int] | None,
    spatial_dims: int,
    depth: int,
    diameter: float,
    network: ModelConfig | None = None,
    voxel_size: Sequence[float] | None = None,
) -> tuple[int, ...]:
    """The block side per spatial axis: ``block_size`` (one side for every axis, or one per
    axis, Z,Y,X or Y,X), checked; by default 256 (2D) or 64 (3D), grown where a deep network (of
    depth ``depth``, 0 without one; ``network`` its config) or the diameter needs larger
    blocks."""
    limits = axis_limits(spatial_dims, depth, diameter, network, voxel_size)
    if block_size is None:
        isotropic = max(default_block_size(spatial_dims), *(limit.smallest for limit in limits))
        return (isotropic,) * spatial_dims
    sizes = (block_size,) * spatial_dims if isinstance(block_size, int) else tuple(block_size)
    if len(sizes) == 1:
        sizes = sizes * spatial_dims
    if len(sizes) != spatial_dims:
        axes = ",".join("ZYX"[-spatial_dims:])
        raise UserInputError(
            f"--block-size has {len(sizes)} sides, the image {spatial_dims} spatial axes",
            f"give one side for every axis or one per axis, {axes}",
        )
    for size, limit in zip(sizes, limits, strict=True):
        check_block_size(int(size), limit, depth, diameter)
    return tuple(int(size) for size in sizes)
