"""PNG preview of one frame of an OME-Zarr store: the image in grey with its label outlines.

Only the requested frame (one time point, one channel) of the image and of the labels is read.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path

import numpy as np

from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr
from cellulus_scale.io.location import Location
from cellulus_scale.viz.preview import render_preview

GROUND_TRUTH = "ground_truth"  # the label image a preview shows beside the segmentation


def _index(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise UserInputError(f"{what} must be an integer, got {value!r}", f"pass an integer {what}")
    try:
        return operator.index(value)
    except TypeError:
        raise UserInputError(
            f"{what} must be an integer, got {value!r}", f"pass an integer {what}"
        ) from None


def preview_frame(
    store_path: str | os.PathLike[str],
    frame: int,
    output_png: str | os.PathLike[str],
    labels: str = "cellulus",
    channel: int = 0,
    truth: str | os.PathLike[str] | None = None,
) -> Path:
    """Save a PNG of time point ``frame`` of ``store_path`` with outlines of ``labels/<labels>``,
    and beside it the ground truth (``labels/ground_truth`` of ``truth``, or of the store itself
    where it has one).

    The image channel ``channel`` is shown; for 3D data :func:`render_preview` shows the middle z
    plane. Stores left incomplete by an interrupted run, frames or channels out of range and
    unknown label names are refused with :class:`UserInputError`. Returns the PNG path.
    """
    store_path = Location.of(store_path)
    output_png = Path(output_png)
    ome_zarr.check_complete(store_path)
    image = ome_zarr.open_image(store_path)
    label_image = ome_zarr.open_labels(store_path, labels)

    n_frames, n_channels = image.canonical_shape[:2]
    frame = _index(frame, "frame")
    channel = _index(channel, "channel")
    if not 0 <= frame < n_frames:
        raise UserInputError(
            f"frame {frame} is out of range for {store_path}, which has {n_frames} frame(s)",
            f"choose a frame from 0 to {n_frames - 1}",
        )
    if not 0 <= channel < n_channels:
        raise UserInputError(
            f"channel {channel} is out of range for {store_path}, which has "
            f"{n_channels} channel(s)",
            f"choose a channel from 0 to {n_channels - 1}",
        )
    label_shape = label_image.canonical_shape
    image_shape = image.canonical_shape
    if label_shape[1] != 1 or label_shape[0] != n_frames or label_shape[2:] != image_shape[2:]:
        raise UserInputError(
            f"labels/{labels} of {store_path} (axes '{label_image.axes}', shape "
            f"{label_image.data.shape}) do not fit the image (axes '{image.axes}', shape "
            f"{image.data.shape})",
            "choose labels computed for this image",
        )
    parent = output_png.resolve().parent
    if not parent.is_dir():
        raise UserInputError(f"the folder {parent} does not exist", "create it first")

    truth_labels = None
    truth_path = Location.of(truth) if truth is not None else store_path
    if truth is not None or GROUND_TRUTH in image.labels:
        if truth is not None:
            ome_zarr.check_complete(truth_path)
        truth_image = ome_zarr.open_labels(truth_path, GROUND_TRUTH)
        if truth_image.canonical_shape != label_shape:
            raise UserInputError(
                f"the ground truth of {truth_path} (shape {truth_image.data.shape}) does not fit"
                f" {store_path} (shape {image.data.shape})",
                "pass --truth with the store the output was computed from",
            )
        truth_labels = _frame(truth_image, frame, 0)
    pixels = _frame(image, frame, channel)
    outlines = _frame(label_image, frame, 0)
    if pixels.shape[0] == 1:  # a single z plane: show it as a 2D image
        pixels, outlines = pixels[0], outlines[0]
        truth_labels = truth_labels[0] if truth_labels is not None else None
    title = f"{store_path.name} t={frame}"
    names = (f"labels/{labels}", "ground truth")
    render_preview(pixels, outlines, output_png, title=title, truth=truth_labels, names=names)
    return output_png


def _frame(image: ome_zarr.OmeImage, frame: int, channel: int) -> np.ndarray:
    """One frame of one channel, (Z, Y, X)."""
    return np.asarray(image.canonical()[frame, channel].compute(scheduler="threads"))
