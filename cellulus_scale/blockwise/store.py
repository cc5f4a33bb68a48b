"""The input and the output store of a blockwise run.

The output (``OUT.zarr``, NGFF 0.4) holds a copy of the image (array ``0``), the instance labels
``labels/cellulus``, the feature images a method declares (:class:`FeatureImage`, e.g. the OCE
embeddings), and, while the run is unfinished, the recorded block results under
``.cellulus-scale/``. Tasks read their read-region of the input and write only their block's
core of the outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from cellulus_scale.blockwise.blocks import Block
from cellulus_scale.blockwise.plan import LABELS_NAME, WORK_DIR, Plan  # noqa: F401 (re-exported)
from cellulus_scale.blockwise.worker import cached
from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr
from cellulus_scale.io.location import Location

#: Up to this many objects, the labels' ``image-label`` metadata lists a colour per ID (a few
#: tens of kB of JSON); above it, viewers choose their own colours.
LABEL_COLOURS_MAX = 1000


@dataclass(frozen=True)
class FeatureImage:
    """An image (t, c, *spatial) that a method writes besides the labels, chunked like the
    blocks: at the end of the run kept as an NGFF image (one level) if ``keep``, else removed
    before the pyramids are made. ``name`` is its path in the output (under :data:`WORK_DIR`
    for a method's scratch); ``filters`` are numcodecs configurations applied before
    compression."""

    name: str
    channels: int
    keep: bool = False
    dtype: str = "float32"
    filters: tuple[dict[str, Any], ...] = ()


# --- the input -------------------------------------------------------------------------------


def input_image(plan: Plan) -> ome_zarr.OmeImage:
    """The plan's input, opened once per worker."""
    return cached(
        ("image", plan.input_path, plan.input_axes),
        lambda: ome_zarr.open_image(plan.input_path, plan.input_axes or None),
    )


def read_region(plan: Plan, frame: int, indices: Sequence[np.ndarray]) -> np.ndarray:
    """Read (C, *spatial) of ``frame`` at the given global index vectors (reflection applied):
    only the bounding box is read, then the indices are taken from it."""
    data = input_image(plan).canonical()
    boxes = tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
    if plan.spatial_dims == 2:
        region = data[frame, :, 0][(slice(None), *boxes)]
    else:
        region = data[frame][(slice(None), *boxes)]
    try:
        values = np.asarray(region.compute(scheduler="synchronous"))
    except Exception as error:
        bad = " and ".join(ome_zarr.damaged_chunks(input_image(plan), frame, boxes))
        raise UserInputError(
            f"cannot read frame {frame}, region {[(b.start, b.stop) for b in boxes]} of "
            f"{plan.input_path}{f', damaged chunk {bad}' if bad else ''}"
            f" ({type(error).__name__}: {str(error)[:80]})",
            "the input store is damaged there; repair or re-export it, then rerun with --resume",
        ) from None
    local = np.ix_(*[i - b.start for i, b in zip(indices, boxes, strict=True)])
    return values[(slice(None), *local)]


def check_finite(values: np.ndarray, plan: Plan, frame: int) -> None:
    """Refuse input values that are NaN or Inf."""
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        kinds = (("NaN", np.isnan), ("Inf", np.isinf))
        found = " and ".join(name for name, test in kinds if test(values).any())
        raise UserInputError(
            f"frame {frame} of {plan.input_path} contains {found} values",
            "replace them (e.g. with 0) before predicting",
        )


# --- block writes and reads of the output ------------------------------------------------------


def output_array(plan: Plan, name: str) -> zarr.Array:
    return zarr.open_array((plan.output / name).url, mode="r+")


def output_index(
    plan: Plan, frame: int, core: Sequence[slice], channels: slice, axes: str | None = None
) -> tuple:
    """Index into an output array with the input's axes (t, c, z, y, x subset), or ``axes``."""
    axes = plan.input_axes if axes is None else axes
    spatial = dict(zip("zyx"[-plan.spatial_dims :], core, strict=True))
    index = []
    for axis in axes:
        if axis == "t":
            index.append(frame)
        elif axis == "c":
            index.append(channels)
        elif axis in spatial:
            index.append(spatial[axis])
        else:  # a z axis of length 1 in 2D data
            index.append(slice(0, 1))
    return tuple(index)


def squeeze_like(plan: Plan, values: np.ndarray, axes: str | None = None) -> np.ndarray:
    """Shape (C, *spatial) values for assignment into :func:`output_index`."""
    axes = plan.input_axes if axes is None else axes
    shaped = values if "c" in axes else values[0]
    if "z" in axes and plan.spatial_dims == 2:
        shaped = shaped[:, None] if "c" in axes else shaped[None]
    return shaped


def write_image_core(plan: Plan, frame: int, block: Block, values: np.ndarray) -> None:
    """Write the block's core (C, *core) of the image into the output's copy of the image
    (none when writing into the input)."""
    if plan.into_input:
        return
    copy = output_array(plan, "0")
    copy[output_index(plan, frame, block.core, slice(None))] = squeeze_like(
        plan, values.astype(copy.dtype)
    )


def labels_array(plan: Plan) -> zarr.Array:
    return output_array(plan, f"labels/{plan.labels_name}/0")


def write_labels_core(
    plan: Plan, target: zarr.Array, frame: int, block: Block, labels: np.ndarray
) -> None:
    """Write the block's core (*core) of the labels into ``target`` (:func:`labels_array`),
    whose axes are the input's less ``c``."""
    axes = label_axes(plan)
    target[output_index(plan, frame, block.core, slice(0, 1), axes)] = squeeze_like(
        plan, labels[None], axes
    )


def label_axes(plan: Plan) -> str:
    """The axes of the output's labels: the input's less ``c`` (README, "Data layout")."""
    return plan.input_axes.replace("c", "")


def write_feature_core(plan: Plan, name: str, frame: int, block: Block, values: np.ndarray) -> None:
    """Write the block's core (channels, *core) of the feature image ``name``."""
    array = output_array(plan, f"{name}/0")
    index = (frame, slice(None)) + block.core
    array[index] = values


def read_feature(plan: Plan, name: str, frame: int, region: Sequence[slice]) -> np.ndarray:
    """Read (channels, *region) of ``frame`` of the feature image ``name``."""
    array = zarr.open_array((plan.output / name / "0").url, mode="r")
    return array[(frame, slice(None)) + tuple(region)]


# --- preparing and finishing the output --------------------------------------------------------


def status_group(plan: Plan, root: zarr.Group) -> zarr.Group:
    """Where the run's status is recorded: the output's root, or, writing into the input, the
    run's work folder in the input's labels group."""
    return root[plan.work_dir] if plan.into_input else root


def prepare_output(
    plan: Plan,
    image: ome_zarr.OmeImage,
    overwrite: bool,
    resume: bool,
    features: Sequence[FeatureImage] = (),
) -> zarr.Group:
    """A new output store marked incomplete, with the empty image copy and feature images; or,
    with ``resume``, the interrupted store of the same plan. Writing into the input, the input's
    root opened for writing its labels group (the status and scratch in its work folder)."""
    out = plan.output
    status_path = plan.work_path if plan.into_input else out
    if resume:
        status = ome_zarr.run_status(status_path) if status_path.exists() else {}
        if status.get("status") != "incomplete":
            what = "is complete" if status.get("status") == "complete" else "has no interrupted run"
            raise UserInputError(f"--resume: {out} {what}", "drop --resume (and pass --overwrite)")
        if status.get("command", "predict") != "predict":
            raise UserInputError(
                f"--resume: {out} holds an interrupted {status['command']} run, not a prediction",
                f"finish it with '{status['command']} --resume'",
            )
        if status.get("plan") != json.loads(json.dumps(plan.to_json())):
            raise UserInputError(
                f"--resume: the settings differ from those of the interrupted run in {out}",
                "rerun with the same input, model and options, or start again with --overwrite",
            )
        return ome_zarr.open_group_for_update(out)
    if plan.into_input:
        root = ome_zarr.open_group_for_update(out)
        ome_zarr.check_labels_writable(out, plan.labels_name, overwrite)
        ome_zarr.unlist_labels(root, plan.labels_name)
        ome_zarr.remove_store(out / "labels" / plan.labels_name)
        ome_zarr.remove_store(plan.work_path)
        status_root = root.require_group(plan.work_dir)
    else:
        ome_zarr.check_output_path(out, overwrite, inputs=[image.path])
        if out.exists():
            ome_zarr.remove_store(out)
        root = status_root = ome_zarr.create_group(out, plan.ngff_version)
    ome_zarr.mark_status(status_root, "incomplete", command="predict", plan=plan.to_json())
    spatial_chunks = tuple(plan.block_size)
    if not plan.into_input:
        chunks = _chunks(plan, image.axes, image.data.shape)
        ome_zarr.create_level0(
            root, image.data.shape, chunks, image.data.dtype, dimension_names=image.axes
        )
    feature_axes = "tc" + ome_zarr.SPATIAL_AXES[-plan.spatial_dims :]
    for feature in features:
        group = root.require_group(feature.name)
        ome_zarr.create_level0(
            group,
            (plan.frames, feature.channels, *plan.spatial_shape),
            (1, feature.channels, *spatial_chunks),
            np.dtype(feature.dtype),
            filters=feature.filters,
            dimension_names=feature_axes,
        )
    return root


def _chunks(plan: Plan, axes: str, shape: Sequence[int]) -> tuple[int, ...]:
    spatial = dict(zip("zyx"[-plan.spatial_dims :], plan.block_size, strict=True))
    chunks = []
    for axis, size in zip(axes, shape, strict=True):
        if axis == "t":
            chunks.append(1)
        elif axis == "c":
            chunks.append(size)
        else:
            chunks.append(min(size, spatial.get(axis, 1)))
    return tuple(chunks)


def prepare_labels(plan: Plan, image: ome_zarr.OmeImage, root: zarr.Group, objects: int) -> bool:
    """Create the label array, in the dtype the object count needs, unless a resumed run
    already has it; True if it was created (the label blocks recorded before are then void)."""
    dtype = ome_zarr.label_dtype(objects)
    axes, label_shape = ome_zarr.label_axes_shape(image)
    labels_path = plan.output / "labels" / plan.labels_name / "0"
    if labels_path.exists():
        existing = zarr.open_array(labels_path.url, mode="r")
        if existing.dtype == dtype and existing.shape == label_shape:
            return False
    ome_zarr.create_labels(
        root, plan.labels_name, label_shape, _chunks(plan, axes, label_shape), dtype, axes
    )
    return True


def _feature_space(image: ome_zarr.OmeImage, axes: str) -> ome_zarr.Space:
    """The image's space on ``axes`` (a feature image's t, c and spatial axes); axes the image
    lacks get scale 1, translation 0 and no unit."""
    space = image.space
    where = {a: i for i, a in enumerate(space.axes)}
    return ome_zarr.Space(
        axes,
        tuple(space.scale[where[a]] if a in where and a != "c" else 1.0 for a in axes),
        tuple(space.translation[where[a]] if a in where and a != "c" else 0.0 for a in axes),
        tuple(space.units[where[a]] if a in where and a != "c" else None for a in axes),
    )


def finish_output(
    plan: Plan,
    image: ome_zarr.OmeImage,
    root: zarr.Group,
    features: Sequence[FeatureImage],
    finishing: Callable[[], None] | None = None,
    **details: object,
) -> None:
    """Pyramids and NGFF metadata (the input's units, scale, translation and ``omero`` channels
    carried over; the labels' colours where there are few objects), feature images kept or
    removed, ``finishing()`` (e.g. the tracks' own), then mark the store complete with
    ``details`` (the last write of a run). The feature images not kept go first, so that they
    and the pyramids never take disk space together."""
    for feature in features:
        if not feature.keep:
            ome_zarr.remove_store(plan.output / feature.name)
    name = Location.of(plan.input_path).stem
    if not plan.into_input:
        ome_zarr.finish_multiscale(root, image.space, None, name, omero=image.omero)
    objects = int(details.get("objects", 0))  # type: ignore[call-overload]
    colours = ome_zarr.label_colours(objects) if 0 < objects <= LABEL_COLOURS_MAX else None
    if plan.into_input:  # the run's record goes with the labels, which are listed last
        record = {**ome_zarr.run_status(plan.work_path), **details}
        record.pop("status", None)
        ome_zarr.mark_status(root["labels"][plan.labels_name], "complete", **record)
    ome_zarr.finish_labels(root, plan.labels_name, ome_zarr.label_space(image), None, colours)
    if finishing is not None:
        finishing()
    for feature in features:
        if feature.keep:
            space = _feature_space(image, "tc" + "zyx"[-plan.spatial_dims :])
            ome_zarr.finish_multiscale(
                root[feature.name], space, None, feature.name, levels=1, method="nearest"
            )
    ome_zarr.remove_store(plan.work_path)
    if not plan.into_input:
        ome_zarr.mark_status(root, "complete", **details)
