"""What every method shares: the plug-in interface (:class:`Method`), the settings the plan
carries for it, the statistics it reports, and the per-worker model and read window of the
methods that run a network.

A method is a module that declares its stages and runs them on a
:class:`~cellulus_scale.blockwise.engine.Session`; it imports no other method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cellulus_scale.blockwise.blocks import Block
from cellulus_scale.blockwise.engine import Session
from cellulus_scale.blockwise.plan import Plan
from cellulus_scale.blockwise.store import FeatureImage, read_region
from cellulus_scale.blockwise.worker import cached
from cellulus_scale.config import NETWORK_TASK_THREADS, SegmentationConfig
from cellulus_scale.io.location import Location
from cellulus_scale.kernels.clustering import postprocess
from cellulus_scale.kernels.noise import reflect_indices
from cellulus_scale.model.checkpoint import Checkpoint, load_checkpoint
from cellulus_scale.model.device import worker_device
from cellulus_scale.model.unet import smallest_valid_size_at_least

EMBEDDINGS_NAME = "embeddings"

#: The keys of a plan's record in the order of the first release, so that the output's
#: metadata stays the same.
_RECORD_ORDER = (
    "input_path",
    "input_axes",
    "output_path",
    "model_path",
    "segmentation",
    "block_size",
    "frames",
    "channels",
    "spatial_shape",
    "network_context",
    "device",
    "method",
)


@dataclass(frozen=True)
class MethodSettings:
    """The segmentation settings and the model of a run, as the plan carries them."""

    segmentation: SegmentationConfig
    model_path: str = ""  # resolved; "" without a model
    network_context: int = 0  # pixels the network loses per side; 0 without a model
    # per spatial axis, where they differ (an anisotropic 3D model): the context, and the voxel
    # size in in-plane pixels that embeddings, distances and sizes are measured in
    network_halos: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    # the image's voxel size per spatial axis in in-plane pixels (None: square pixels or cubic
    # voxels), whatever the model: post-processing and linking measure distances with it
    voxel_size: tuple[float, ...] | None = None

    def halos(self, dims: int) -> tuple[int, ...]:
        """The network's context per spatial axis."""
        return self.network_halos or (self.network_context,) * dims

    def record(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The plan's record: its ``fields`` and these settings."""
        values = {
            **fields,
            "model_path": self.model_path,
            "segmentation": asdict(self.segmentation),
            "network_context": self.network_context,
        }
        if self.network_halos is not None:
            values["network_halos"] = list(self.network_halos)
        if self.spacing is not None:
            values["spacing"] = list(self.spacing)
        if self.voxel_size is not None:
            values["voxel_size"] = list(self.voxel_size)
        ordered = {key: values.pop(key) for key in _RECORD_ORDER if key in values}
        return {**ordered, **values}


@dataclass(frozen=True)
class Statistics:
    """Whole-video statistics, computed once before any clustering."""

    threshold: float
    mean_offset: tuple[float, ...]
    frames_with_signal: tuple[bool, ...]
    foreground_fraction: float


class WrittenObjects:
    """The IDs the labels stage wrote, gathered from its block results (``objects``): the
    count a run reports is what the store holds, not how many centres were numbered."""

    def __init__(self) -> None:
        self.ids: set[int] = set()

    def add(self, result: dict[str, np.ndarray]) -> None:
        self.ids.update(int(i) for i in result["objects"])

    @property
    def count(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class MethodResult:
    """What a method's stages found."""

    objects: int
    statistics: Statistics


@dataclass(frozen=True)
class Method:
    """A segmentation method as a plug-in of the blockwise engine."""

    name: str  # recorded in the plan
    #: the stages on a session; the checkpoint of the model (None without one)
    run: Callable[[Session, Checkpoint | None], MethodResult]
    #: the feature images it writes; the argument: whether to keep its embeddings
    features: Callable[[Plan, bool], Sequence[FeatureImage]]
    network: bool  # runs a network: a local cluster gets GPU workers


def embeddings_image(plan: Plan, keep: bool) -> FeatureImage:
    """The OCE offsets and their std, (t, dims + 1, *spatial)."""
    return FeatureImage(EMBEDDINGS_NAME, plan.spatial_dims + 1, keep)


def load_model(plan: Plan) -> tuple[Any, Checkpoint, Any]:
    """(model, checkpoint, device) of the plan's model, loaded once per worker process (again
    only if the file is replaced, locally or in object storage). torch computes with
    :data:`NETWORK_TASK_THREADS` threads in every worker: its CPU kernels sum in an order that
    depends on the thread count, so a count that followed the cluster's layout would make the
    labels depend on it."""
    import torch

    model_path = plan.settings.model_path

    def make() -> tuple[Any, Checkpoint, Any]:
        torch.set_num_threads(NETWORK_TASK_THREADS)
        device = worker_device(plan.device)
        checkpoint = load_checkpoint(model_path)
        return checkpoint.build_model(device), checkpoint, device

    stamp = Location.of(model_path).stamp()
    return cached(("model", model_path, stamp, plan.device), make)


def network_window(
    plan: Plan,
    block: Block,
    halo: int | Sequence[int],
    depth: int,
    flat_levels: Sequence[int] | None = None,
    grid: int = 1,
) -> list[np.ndarray]:
    """Global indices, per axis, of the network's input for ``block``: from ``halo`` (one per
    axis, or the same on every axis) before the block to the smallest size the depth-``depth``
    network (``flat_levels`` per axis and ``grid``, see
    :func:`~cellulus_scale.model.unet.output_size`) takes that covers ``halo`` after it,
    reflected at the frame border."""
    dims = len(block.start)
    halos = (halo,) * dims if isinstance(halo, int) else tuple(halo)
    flats = tuple(flat_levels) if flat_levels is not None else (0,) * dims
    indices = []
    for start, size, length, h, flat in zip(
        block.start, block.shape, plan.spatial_shape, halos, flats, strict=True
    ):
        read = smallest_valid_size_at_least(size + 2 * h, depth, flat, grid)
        indices.append(reflect_indices(start - h, start - h + read, length))
    return indices


def postprocess_region(
    plan: Plan, frame: int, region: Sequence[slice], labels: np.ndarray
) -> np.ndarray:
    """The run's post-processing of the ``labels`` of ``region`` of ``frame``: ``--mode``, the
    minimum size and the contrast rule, distances and sizes physical where the voxels are not
    cubes (:func:`~cellulus_scale.kernels.clustering.postprocess`)."""
    seg = plan.settings.segmentation
    spacing = plan.settings.voxel_size
    intensity = None
    if seg.mode == "nucleus" or seg.min_contrast is not None:
        indices = [np.arange(r.start, r.stop) for r in region]
        intensity = read_region(plan, frame, indices).astype(np.float32).mean(axis=0)
    voxel = 1.0 if spacing is None else float(np.prod(spacing))
    return postprocess(
        labels,
        intensity,
        seg.mode,
        seg.grow_distance,
        seg.shrink_distance,
        seg.min_size(plan.spatial_dims) / voxel,
        seg.contrast_ring,
        seg.min_contrast,
        spacing,
        seg.nucleus_threshold_for(plan.spatial_dims),
    )
