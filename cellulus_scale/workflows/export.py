"""Plain exports of a segmentation (``cellulus-scale export``): the labels as one TIFF per frame
(``mask000.tif``, ...; a z-stack per frame for 3D data), as Cellpose, StarDist and the Cell
Tracking Challenge use them, and a CSV of per-object measurements (frame, label, centroid,
area, mean intensity per channel) from :func:`skimage.measure.regionprops_table`.

Frames are exported one Dask task each: a task reads one frame of the labels and of the image,
writes its TIFF and returns its rows; the CSV is written in frame order as batches of frames
finish, so neither the video nor its table is ever held whole.
"""

from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np

from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr
from cellulus_scale.io.location import local_store

MEASUREMENTS = "measurements.csv"


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    folder: Path
    masks: list[Path]  # one TIFF per frame, in frame order
    measurements: Path | None
    objects: int  # rows of the CSV (objects counted once per frame they appear in)


def mask_name(frame: int, frames: int) -> str:
    """``mask000.tif`` (at least three digits, more for longer videos)."""
    return f"mask{frame:0{max(3, len(str(frames - 1)))}d}.tif"


def _channel_names(image: ome_zarr.OmeImage, channels: int) -> list[str]:
    """The image's channel names (``omero``), made safe as CSV column suffixes; else 0, 1..."""
    names = []
    listed = (image.omero or {}).get("channels", [])
    for index in range(channels):
        label = listed[index].get("label") if index < len(listed) else None
        text = "".join(c if c.isalnum() else "_" for c in str(label)).strip("_") if label else ""
        names.append(text or str(index))
    return names if len(set(names)) == channels else [str(i) for i in range(channels)]


def _columns(spatial_dims: int, channel_names: list[str]) -> list[str]:
    axes = "zyx"[-spatial_dims:]
    columns = ["frame", "label", *[f"centroid_{a}" for a in axes], "area"]
    if len(channel_names) == 1:
        return [*columns, "mean_intensity"]
    return [*columns, *[f"mean_intensity_{name}" for name in channel_names]]


def _export_frame(
    frame: int,
    labels: np.ndarray,
    pixels: np.ndarray,
    mask: Path | None,
    dtype: np.dtype,
    columns: list[str],
) -> list[list[Any]]:
    """Write one frame's mask (labels (z, y, x), a single plane as (y, x)) and measure its
    objects on the image (C, z, y, x); the rows of the CSV."""
    import tifffile
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    pixels = np.asarray(pixels)
    if labels.shape[0] == 1:  # a single z plane: a 2D mask and 2D measurements
        labels, pixels = labels[0], pixels[:, 0]
    if mask is not None:
        tifffile.imwrite(mask, labels.astype(dtype, copy=False))
    if not columns:
        return []
    intensity = np.moveaxis(pixels, 0, -1) if pixels.shape[0] > 1 else pixels[0]
    table = regionprops_table(
        labels.astype(np.int64, copy=False),
        intensity_image=intensity.astype(np.float64, copy=False),
        properties=("label", "centroid", "area", "intensity_mean"),
    )
    dims = labels.ndim
    values = [table["label"]]
    values += [table[f"centroid-{i}"] for i in range(dims)]
    values.append(table["area"])
    if pixels.shape[0] == 1:
        values.append(table["intensity_mean"])
    else:
        values += [table[f"intensity_mean-{c}"] for c in range(pixels.shape[0])]
    rows = []
    for index in range(len(table["label"])):
        row: list[Any] = [frame, int(values[0][index])]
        row += [round(float(v[index]), 4) for v in values[1 : 1 + dims]]
        row.append(int(values[1 + dims][index]))
        row += [round(float(v[index]), 4) for v in values[2 + dims :]]
        rows.append(row)
    return rows


def _check_folder(folder: Path, overwrite: bool) -> None:
    parent = folder.resolve().parent
    if not parent.is_dir():
        raise UserInputError(f"the folder {parent} does not exist", "create it first")
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{folder} is a file, not a folder", "choose a folder to export to")
    if folder.is_dir() and not overwrite:
        found = sorted(p.name for p in folder.iterdir() if p.name.startswith("mask"))
        found += [MEASUREMENTS] if (folder / MEASUREMENTS).exists() else []
        if found:
            raise UserInputError(
                f"{folder} already holds an export ({found[0]}, ...)",
                "pass --overwrite to replace it or choose another folder",
            )


def _label_dtype(store: Path, labels: Any) -> np.dtype:
    """uint16 where every ID fits (ImageJ, the Cell Tracking Challenge), else the labels'."""
    objects = ome_zarr.run_status(store).get("objects")
    highest = int(objects) if isinstance(objects, int) else int(labels.max().compute())
    return np.dtype(np.uint16) if highest <= np.iinfo(np.uint16).max else labels.dtype


def export(
    store_path: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    labels: str = "cellulus",
    masks: bool = True,
    measurements: bool = True,
    overwrite: bool = False,
    client: Any = None,
) -> ExportResult:
    """Export ``labels/<labels>`` of ``store_path`` (a ``predict`` output, or any NGFF image
    with label images) into ``folder``: ``mask000.tif``... (one per time point) and
    ``measurements.csv`` (frame, label, centroid in pixels (z,) y, x, area in pixels, mean
    intensity per image channel). Frames run as Dask tasks on ``client`` if given, else on
    threads. Refuses an incomplete store, label images that do not fit the image, and an
    existing export unless ``overwrite``."""
    store = local_store(store_path, "export")
    folder = Path(folder)
    ome_zarr.check_complete(store)
    image = ome_zarr.open_image(store)
    label_image = ome_zarr.open_labels(store, labels)
    frames, channels, *spatial = image.canonical_shape
    l_frames, l_channels, *l_spatial = label_image.canonical_shape
    if (l_frames, l_channels, l_spatial) != (frames, 1, spatial):
        raise UserInputError(
            f"labels/{labels} of {store} (axes '{label_image.axes}', shape "
            f"{label_image.data.shape}) do not fit the image (axes '{image.axes}', shape "
            f"{image.data.shape})",
            "choose labels computed for this image",
        )
    if label_image.data.dtype.kind not in "iu":
        raise UserInputError(
            f"labels/{labels} of {store} have dtype {label_image.data.dtype}, not integers",
            "export instance label images (integer IDs, 0 = background)",
        )
    if not (masks or measurements):
        raise UserInputError("nothing to export", "drop --no-masks or --no-measurements")
    _check_folder(folder, overwrite)
    folder.mkdir(exist_ok=True)
    for stale in [*folder.glob("mask*.tif"), folder / MEASUREMENTS]:
        if stale.exists():
            stale.unlink()

    label_frames = label_image.canonical()[:, 0]  # (t, z, y, x)
    pixel_frames = image.canonical()  # (t, c, z, y, x)
    dtype = _label_dtype(store, label_frames) if masks else label_image.data.dtype
    names = _channel_names(image, channels)
    spatial_dims = 3 if spatial[0] > 1 else 2
    columns = _columns(spatial_dims, names) if measurements else []
    written = [folder / mask_name(t, frames) for t in range(frames)] if masks else []
    csv_path = folder / MEASUREMENTS if measurements else None
    batch = max(4, 4 * (len(client.ncores()) if client is not None else (os.cpu_count() or 1)))
    objects = 0
    with contextlib.ExitStack() as stack:
        writer = None
        if csv_path is not None:
            writer = csv.writer(stack.enter_context(csv_path.open("w", newline="")))
            writer.writerow(columns)
        for start in range(0, frames, batch):
            tasks = [
                dask.delayed(_export_frame, pure=False)(
                    t,
                    label_frames[t],
                    pixel_frames[t],
                    written[t] if masks else None,
                    dtype,
                    columns,
                )
                for t in range(start, min(frames, start + batch))
            ]
            if client is not None:
                done = client.gather(client.compute(tasks))
            else:
                done = dask.compute(*tasks, scheduler="threads")
            for rows in done:
                if writer is not None:
                    writer.writerows(rows)
                objects += len(rows)
    return ExportResult(folder, written, csv_path, objects)
