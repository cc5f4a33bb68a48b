"""OME-Zarr input and output: lazy reading of NGFF 0.4/0.5 images, blockwise writing of both.

Images are read as Dask arrays of their full-resolution level, with the metadata a copy must
carry: axis units, scale and translation, and the ``omero`` channel names and colours.
cellulus-scale writes NGFF 0.4 (zarr v2) by default and NGFF 0.5 (zarr v3, every array
sharded: one shard per block and frame, so that one task writes whole files, made of inner
chunks of at most :data:`INNER_CHUNK` pixels per axis for viewers) on request; the version of a
group decides how its arrays and metadata are written (see README, "Data layout"). Image
pyramids are anti-aliased with ome-zarr-py's own downsampling (``skimage.transform.resize``,
chunk by chunk); label pyramids take every second pixel (nearest), so they hold no new label
values.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from ome_zarr.axes import KNOWN_SPATIAL_UNITS, KNOWN_TEMPORAL_UNITS
from ome_zarr.format import Format, FormatV04, FormatV05
from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

from cellulus_scale.config import NGFF_VERSION, NGFF_VERSIONS
from cellulus_scale.errors import UserInputError
from cellulus_scale.io.location import Location

CANONICAL_AXES = "tczyx"
SPATIAL_AXES = "zyx"
STATUS_KEY = "cellulus_scale"
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_KNOWN_UNITS = {"space": set(KNOWN_SPATIAL_UNITS), "time": set(KNOWN_TEMPORAL_UNITS)}
#: The pyramid methods: ``resize`` is ome-zarr-py's default (anti-aliased, for images),
#: ``nearest`` takes every second pixel (for labels and other images of IDs).
PYRAMID_METHODS = ("resize", "nearest")
#: The compressor of every array written: Blosc's zstd (level 1, byte shuffle). On real uint16
#: nuclei it stores the image copy in 0.78x and the labels in 0.30x the bytes of Blosc's lz4,
#: zarr's default, and levels 3 and 5 gain nothing on the image for 3x and 5x the time
#: (README, "Data layout"); every zarr reader has Blosc.
COMPRESSOR = {"id": "blosc", "cname": "zstd", "clevel": 1, "shuffle": 1, "blocksize": 0}
# The compact OCEs' delta filter in zarr v3 is a numcodecs codec, which zarr warns about each
# time such an array is opened; it is scratch, read back only by this package.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
#: The zarr format of each NGFF version written.
NGFF_ZARR_FORMATS = {"0.4": 2, "0.5": 3}
#: NGFF 0.5 arrays are sharded, one shard per write unit (a block and frame); its inner chunks,
#: what a viewer reads at once, are at most this many pixels per axis (the largest divisor of
#: the shard's side up to it, where that is at least half of it; else the whole side).
INNER_CHUNK = 128


@dataclass(frozen=True)
class OmeImage:
    """A lazily opened image: its full-resolution data, axis names and physical scale."""

    path: Location
    data: da.Array
    axes: str
    scale: tuple[float, ...]
    ngff_version: str | None
    labels: tuple[str, ...] = ()
    #: per axis, its NGFF unit (e.g. "micrometer", "second") or None
    units: tuple[str | None, ...] = ()
    #: per axis, the physical position of the first pixel's centre (all 0 when not given)
    translation: tuple[float, ...] = ()
    #: the image's ``omero`` metadata (channel names, colours, windows), or None
    omero: dict[str, Any] | None = None

    @property
    def spatial_axes(self) -> str:
        return "".join(a for a in self.axes if a in SPATIAL_AXES)

    def canonical(self) -> da.Array:
        """The data as 5D (t, c, z, y, x), inserting axes of length 1 where missing."""
        index = tuple(slice(None) if a in self.axes else None for a in CANONICAL_AXES)
        return self.data[index]

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        sizes = dict(zip(self.axes, self.data.shape, strict=True))
        return tuple(sizes.get(a, 1) for a in CANONICAL_AXES)

    @property
    def spatial_dims(self) -> int:
        """2 for yx images, 3 where a z axis longer than one plane exists."""
        sizes = dict(zip(self.axes, self.data.shape, strict=True))
        return 3 if sizes.get("z", 1) > 1 else 2

    @property
    def canonical_scale(self) -> tuple[float, ...]:
        values = dict(zip(self.axes, self.scale, strict=True))
        return tuple(float(values.get(a, 1.0)) for a in CANONICAL_AXES)

    @property
    def space(self) -> Space:
        """The physical space of the image: axes, scale, translation and units."""
        n = len(self.axes)
        return Space(
            self.axes,
            tuple(self.scale),
            tuple(self.translation) or (0.0,) * n,
            tuple(self.units) or (None,) * n,
        )


@dataclass(frozen=True)
class Space:
    """The axes of an image with, per axis, the scale (size of a pixel), the translation (the
    physical position of the first pixel's centre) and the unit (or None): what every image
    and label image of one store share, so that viewers overlay them."""

    axes: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]
    units: tuple[str | None, ...]

    @classmethod
    def plain(cls, axes: str, scale: Sequence[float] | None = None) -> Space:
        n = len(axes)
        return cls(axes, tuple(scale) if scale is not None else (1.0,) * n, (0.0,) * n, (None,) * n)

    def without(self, drop: str) -> Space:
        """The same space less the axes in ``drop`` (e.g. "c" for a label image)."""
        keep = [i for i, a in enumerate(self.axes) if a not in drop]
        return Space(
            "".join(self.axes[i] for i in keep),
            tuple(self.scale[i] for i in keep),
            tuple(self.translation[i] for i in keep),
            tuple(self.units[i] for i in keep),
        )

    def axes_metadata(self) -> list[dict[str, str]]:
        """NGFF axes, with units where known."""
        result = []
        for axis, unit in zip(self.axes, self.units, strict=True):
            entry = {"name": axis, "type": _AXIS_TYPES[axis]}
            if unit is not None:
                entry["unit"] = unit
            result.append(entry)
        return result


def validate_axes(axes: str, ndim: int | None = None, where: str = "--axes") -> str:
    """Check an axis string is an NGFF-legal ordered subset of t, c, z, y, x."""
    axes = axes.lower()
    positions = [CANONICAL_AXES.find(a) for a in axes]
    if (
        not axes
        or -1 in positions
        or positions != sorted(positions)
        or len(set(axes)) != len(axes)
        or not axes.endswith("yx")
    ):
        raise UserInputError(
            f"{where} '{axes}' is not an ordered subset of t, c, z, y, x ending in yx",
            "use e.g. --axes yx, tyx, tcyx or tzyx",
        )
    if ndim is not None and len(axes) != ndim:
        raise UserInputError(
            f"{where} '{axes}' names {len(axes)} axes but the array has {ndim} dimensions",
            f"pass --axes with exactly {ndim} letters",
        )
    return axes


def check_dtype(dtype: np.dtype, what: str = "image") -> None:
    """Refuse dtypes the pipeline cannot segment (complex, bool, object, strings)."""
    if np.dtype(dtype).kind not in "uif":
        raise UserInputError(
            f"the {what} has dtype {np.dtype(dtype)}, which cannot be segmented",
            "convert it to an integer or floating-point dtype (e.g. uint16 or float32)",
        )


def _open_zarr(location: Location) -> zarr.Group | zarr.Array:
    if location.remote:
        try:
            return zarr.open(store=location.url, mode="r")
        except Exception as error:  # fsspec and zarr raise many types (missing, denied, ...)
            raise UserInputError(
                f"{location} is not a readable zarr store ({type(error).__name__}:"
                f" {' '.join(str(error).split())[:80]})",
                "check the URL and the credentials in the environment (e.g. AWS_ACCESS_KEY_ID,"
                " AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)",
            ) from None
    path = location.path
    if not path.exists():
        raise UserInputError(f"no such file or directory: {path}", "check the path")
    if path.is_file() and path.suffix.lower() in (".tif", ".tiff"):
        raise UserInputError(
            f"{path} is a TIFF file, not an OME-Zarr image",
            f"convert it first, e.g. 'bioformats2raw {path} {path.with_suffix('.zarr')}', or in"
            " Python with tifffile.imread and ome_zarr.writer.write_image",
        )
    try:
        return zarr.open(store=str(path), mode="r")
    except Exception as error:  # zarr raises several types for a non-zarr folder
        raise UserInputError(
            f"{path} is not a readable zarr store ({type(error).__name__})",
            "point at an OME-Zarr image or a zarr array",
        ) from None


def _ngff_attrs(group: zarr.Group) -> tuple[dict[str, Any], str | None]:
    attrs = dict(group.attrs)
    if "ome" in attrs:  # NGFF 0.5 keeps everything under "ome"
        ome = dict(attrs["ome"])
        return ome, str(ome.get("version", "0.5"))
    multiscales = attrs.get("multiscales")
    version = multiscales[0].get("version") if multiscales else None
    return attrs, version


def _transform_of(
    multiscale: dict[str, Any], dataset: dict[str, Any], ndim: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(scale, translation) of a dataset: its own transformations, then the multiscale's."""
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for transforms in (
        dataset.get("coordinateTransformations", []),
        multiscale.get("coordinateTransformations", []),
    ):
        for transform in transforms:
            kind = transform.get("type")
            if kind in ("scale", "translation") and kind in transform:
                values = np.asarray(transform[kind], dtype=float)
                if values.shape != (ndim,):
                    raise ValueError(f"a {kind} of {values.size} values for {ndim} axes")
                if kind == "scale":
                    scale, translation = scale * values, translation * values
                else:
                    translation = translation + values
    return tuple(float(v) for v in scale), tuple(float(v) for v in translation)


def _units_of(multiscale: dict[str, Any]) -> tuple[str | None, ...]:
    """Each axis's unit where NGFF knows it (others are left out: a copy must validate)."""
    units = []
    for axis in multiscale.get("axes", []):
        if not isinstance(axis, dict):
            units.append(None)
            continue
        unit, kind = axis.get("unit"), _AXIS_TYPES.get(str(axis.get("name", "")).lower())
        units.append(unit if unit in _KNOWN_UNITS.get(kind or "", ()) else None)
    return tuple(units)


def _omero_of(attrs: dict[str, Any], channels: int) -> dict[str, Any] | None:
    """The ``omero`` metadata if it describes ``channels`` channels, else None."""
    omero = attrs.get("omero")
    if not isinstance(omero, dict):
        return None
    listed = omero.get("channels")
    if not isinstance(listed, list) or len(listed) != channels:
        return None
    if not all(isinstance(c, dict) for c in listed):
        return None
    return json.loads(json.dumps(omero))


def _open_level(group: zarr.Group, path: Location, key: str) -> zarr.Group | zarr.Array:
    """The array ``key`` of an image group; a damaged array header is named as such."""
    try:
        return group[key]
    except KeyError:
        raise  # a dataset path that does not exist: malformed multiscales metadata
    except Exception as error:  # e.g. a .zarray or zarr.json that is not valid JSON
        raise UserInputError(
            f"the array {path / key} is not readable ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:80]})",
            "its metadata is damaged; repair or re-export the image",
        ) from None


def open_image(path: str | os.PathLike[str] | Location, axes: str | None = None) -> OmeImage:
    """Open an OME-Zarr image (NGFF 0.4 or 0.5) or a plain zarr array lazily, from a local path
    or a URL (:mod:`cellulus_scale.io.location`).

    A plain array needs ``axes`` (e.g. ``"tcyx"``); for an NGFF image ``axes`` must match the
    metadata if given. The store is opened read-only.
    """
    path = Location.of(path)
    node = _open_zarr(path)
    if isinstance(node, zarr.Array):
        if axes is None:
            raise UserInputError(
                f"{path} is a plain zarr array without axis names",
                "name its axes with --axes (e.g. --axes tyx; train and predict take it) "
                "or point at an OME-Zarr image",
            )
        axes = validate_axes(axes, node.ndim)
        check_dtype(node.dtype)
        data = da.from_zarr(node)
        return OmeImage(path, data, axes, (1.0,) * node.ndim, None)
    attrs, version = _ngff_attrs(node)
    multiscales = attrs.get("multiscales")
    if not multiscales:
        if axes is not None and "0" in node and isinstance(node["0"], zarr.Array):
            return open_image(path / "0", axes)
        raise UserInputError(
            f"{path} has no OME-Zarr multiscales metadata",
            "point at an OME-Zarr image, or at a zarr array together with --axes",
        )
    try:
        multiscale = multiscales[0]
        dataset = multiscale["datasets"][0]
        array = _open_level(node, path, dataset["path"])
        if not isinstance(array, zarr.Array):
            raise TypeError(f"dataset '{dataset['path']}' is not an array")
        meta_axes = "".join(
            (a["name"] if isinstance(a, dict) else a).lower() for a in multiscale.get("axes", [])
        )
        scale, translation = _transform_of(multiscale, dataset, array.ndim)
        units = _units_of(multiscale)
    except UserInputError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise UserInputError(
            f"{path} has malformed OME-Zarr multiscales metadata "
            f"({type(error).__name__}: {' '.join(str(error).split())})",
            "repair the metadata or point at the full-resolution array together with --axes",
        ) from None
    if not meta_axes:
        meta_axes = CANONICAL_AXES[-array.ndim :]
    meta_axes = validate_axes(meta_axes, array.ndim, where=f"the axes metadata of {path}")
    if axes is not None and validate_axes(axes) != meta_axes:
        raise UserInputError(
            f"--axes '{axes}' does not match the image's own axes '{meta_axes}'",
            "drop --axes for OME-Zarr images",
        )
    check_dtype(array.dtype)
    labels: tuple[str, ...] = ()
    if "labels" in node:
        label_attrs, _ = _ngff_attrs(node["labels"])
        labels = tuple(label_attrs.get("labels", []))
    channels = array.shape[meta_axes.index("c")] if "c" in meta_axes else 1
    return OmeImage(
        path,
        da.from_zarr(array, chunks=write_chunks(array)),
        meta_axes,
        scale,
        version,
        labels,
        units=units if len(units) == array.ndim else (None,) * array.ndim,
        translation=translation,
        omero=_omero_of(attrs, channels),
    )


#: Metres per NGFF space unit: a diameter given in one unit is converted into the image's.
METRES_PER_UNIT = {
    "yoctometer": 1e-24, "zeptometer": 1e-21, "attometer": 1e-18, "femtometer": 1e-15,
    "picometer": 1e-12, "angstrom": 1e-10, "nanometer": 1e-9, "micrometer": 1e-6,
    "millimeter": 1e-3, "centimeter": 1e-2, "decimeter": 0.1, "meter": 1.0, "hectometer": 1e2,
    "kilometer": 1e3, "megameter": 1e6, "gigameter": 1e9, "terameter": 1e12,
    "petameter": 1e15, "exameter": 1e18, "zettameter": 1e21, "yottameter": 1e24,
    "inch": 0.0254, "foot": 0.3048, "yard": 0.9144, "mile": 1609.344,
    "parsec": 3.0856775814913673e16,
}  # fmt: skip


def diameter_in_pixels(
    image: OmeImage,
    diameter: float,
    unit: str,
    voxel_size: Sequence[float] | None = None,
) -> float:
    """A ``diameter`` given in ``unit`` (an NGFF space unit) as in-plane pixels: divided by the
    x pixel's size, from ``voxel_size`` (Z,Y,X, taken in ``unit``) or else from the image's NGFF
    scale and the x axis' unit."""
    if unit not in METRES_PER_UNIT:
        raise UserInputError(
            f"unknown --diameter-unit '{unit}'", "use an NGFF space unit such as micrometer"
        )
    if voxel_size is not None:
        return float(diameter) / float(voxel_size[-1])
    space = image.space
    x = space.axes.find("x")
    axis_unit = space.units[x] if x >= 0 else None
    if axis_unit is None:
        raise UserInputError(
            f"--diameter-unit {unit}: the x axis of {image.path} has no unit in its NGFF metadata",
            "give --diameter in pixels, or --voxel-size Z,Y,X in that unit",
        )
    in_axis_unit = float(diameter) * METRES_PER_UNIT[unit] / METRES_PER_UNIT[axis_unit]
    return in_axis_unit / float(space.scale[x])


def voxel_spacing(
    image: OmeImage, voxel_size: Sequence[float] | None = None
) -> tuple[float, ...] | None:
    """The voxel size of a 3D image per spatial axis (z, y, x) in units of its x pixel, from
    ``voxel_size`` (Z,Y,X, any one unit) where given, else from the NGFF ``scale``; None for 2D
    images (taken as square pixels) and for isotropic voxels."""
    if image.spatial_dims != 3:
        return None
    if voxel_size is not None:
        values = tuple(float(v) for v in voxel_size)
        if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
            raise UserInputError(
                "--voxel-size must be three positive numbers Z,Y,X, got"
                f" {','.join(map(str, values))}",
                "give the z step and the pixel size, e.g. --voxel-size 2.0,0.5,0.5",
            )
    else:
        values = image.canonical_scale[-3:]
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise UserInputError(
                f"{image.path} has a non-positive or non-finite scale {values} in its metadata",
                "pass --voxel-size Z,Y,X with the voxel size",
            )
    spacing = tuple(v / values[-1] for v in values)
    if all(abs(v - 1.0) < 1e-6 for v in spacing):
        return None
    return spacing


def open_labels(path: str | os.PathLike[str] | Location, name: str) -> OmeImage:
    """Open the label image ``labels/<name>`` of an OME-Zarr image."""
    path = Location.of(path)
    image = open_image(path)
    # object storage over HTTP cannot list folders: the labels group's own list decides there
    if name not in image.labels or (not path.remote and not (path / "labels" / name).exists()):
        found = ", ".join(image.labels) or "none"
        raise UserInputError(
            f"{path} has no label image named '{name}' (found: {found})",
            "choose one of the listed names",
        )
    return open_image(path / "labels" / name)


def check_output_path(
    path: str | os.PathLike[str] | Location,
    overwrite: bool,
    inputs: Sequence[str | os.PathLike[str] | Location] = (),
) -> Path | Location:
    """Refuse to write over an existing output (unless ``overwrite``) or over an input, or
    into a local folder that is missing or not writable; the output's path (a URL's
    :class:`~cellulus_scale.io.location.Location`)."""
    location = Location.of(path)
    for source in inputs:
        if location.same_as(Location.of(source)):
            raise UserInputError(
                f"the output {location} is the input", "choose a different output path"
            )
    if location.exists() and not overwrite:
        try:
            status = run_status(location) if location.is_dir() else {}
        except UserInputError:  # not a zarr store
            status = {}
        if status.get("status") == "incomplete":
            stopped = f" ({status['stopped']})" if status.get("stopped") else ""
            raise UserInputError(
                f"output {path} holds an unfinished run{stopped}",
                "rerun the same command with --resume to finish it, or pass --overwrite to start"
                " again",
            )
        raise UserInputError(
            f"output {location} already exists",
            "pass --overwrite to replace it or choose a new path",
        )
    if location.remote:  # object storage: the first write says whether it may be written
        return location
    parent = location.path.resolve().parent
    if not parent.exists():
        raise UserInputError(f"the folder {parent} does not exist", "create it first")
    if not parent.is_dir():
        raise UserInputError(
            f"{parent} is a file, not a folder", "choose an output path inside a folder"
        )
    if not os.access(parent, os.W_OK):
        raise UserInputError(
            f"the folder {parent} is not writable", "choose a writable output path"
        )
    try:  # os.access says yes to root everywhere but on read-only mounts: really try
        os.rmdir(tempfile.mkdtemp(prefix=".cellulus-scale-probe-", dir=parent))
    except OSError as error:
        raise UserInputError(
            f"cannot create anything in the folder {parent} ({error.strerror or error})",
            "choose a writable output path",
        ) from None
    return location.path


def remove_store(path: str | os.PathLike[str] | Location) -> None:
    """Remove the store (or file) at ``path``, if there is one."""
    Location.of(path).remove()


def pyramid_factors(
    shape: Sequence[int], axes: str, levels: int | None = None, min_size: int = 64
) -> list[tuple[int, ...]]:
    """Downsampling factors per level: 2x in y and x (not t, c or z) until a side < min_size."""
    factors = [tuple(1 for _ in axes)]
    sizes = dict(zip(axes, shape, strict=True))
    level = 1
    while (levels is None or level < levels) and min(
        sizes["y"], sizes["x"]
    ) // 2**level >= min_size:
        factors.append(tuple(2**level if a in "yx" else 1 for a in axes))
        level += 1
    return factors


def create_group(
    path: str | os.PathLike[str] | Location, ngff_version: str = NGFF_VERSION
) -> zarr.Group:
    """Create a new group for an NGFF ``ngff_version`` image (0.4: zarr v2, 0.5: zarr v3)."""
    url = Location.of(path).url
    return zarr.open_group(url, mode="w", zarr_format=NGFF_ZARR_FORMATS[ngff_version])


def open_group_for_update(path: str | os.PathLike[str] | Location) -> zarr.Group:
    """Open an existing group (either zarr format) to write into it."""
    return zarr.open_group(Location.of(path).url, mode="r+")


def ngff_version_of(group: zarr.Group) -> str:
    """The NGFF version a group's images are written in: 0.4 for zarr v2, 0.5 for zarr v3."""
    return "0.5" if group.metadata.zarr_format == 3 else "0.4"


def output_ngff_version(image: OmeImage, requested: str | None, into_input: bool) -> str:
    """The NGFF version a run writes: ``requested`` (default :data:`NGFF_VERSION`) for a new
    output; the image's own where the labels go into it, which ``requested`` must then match."""
    if requested is not None and requested not in NGFF_VERSIONS:
        raise UserInputError(
            f"NGFF version {requested} cannot be written",
            f"choose one of {', '.join(NGFF_VERSIONS)}",
        )
    if not into_input:
        return requested or NGFF_VERSION
    node = _open_zarr(image.path)
    own = ngff_version_of(node) if isinstance(node, zarr.Group) else NGFF_VERSION
    if requested is not None and requested != own:
        raise UserInputError(
            f"--ngff {requested} with --into-input, but {image.path} is NGFF {own}",
            "drop --ngff: labels written into an image take its own version",
        )
    return own


def _ngff_format(group: zarr.Group) -> Format:
    return FormatV05() if group.metadata.zarr_format == 3 else FormatV04()


def ngff_attrs(group: zarr.Group) -> dict[str, Any]:
    """A group's NGFF attributes (those under ``ome`` in NGFF 0.5), as a new dict."""
    attrs = group.attrs.asdict()
    if group.metadata.zarr_format == 3:
        return json.loads(json.dumps(attrs.get("ome", {})))
    return json.loads(json.dumps(attrs))


def put_ngff_attrs(group: zarr.Group, ngff: dict[str, Any]) -> None:
    """Replace a group's NGFF attributes (under ``ome``, with its ``version``, in NGFF 0.5)."""
    if group.metadata.zarr_format == 3:
        group.attrs["ome"] = {"version": "0.5", **{k: v for k, v in ngff.items() if k != "version"}}
    else:
        group.attrs.put({**group.attrs.asdict(), **ngff})


def write_chunks(array: zarr.Array) -> tuple[int, ...]:
    """The unit an array is written in whole files: its shards, or its chunks if unsharded."""
    return tuple(array.shards or array.chunks)


def level_chunks(
    base: Sequence[int], factor: Sequence[int], shape: Sequence[int], zarr_format: int
) -> tuple[int, ...]:
    """The write unit (whole files) of a pyramid level of ``shape``, ``factor`` times smaller
    than level 0 written in ``base``: ``base`` (zarr v2 chunks); in zarr v3 the base's shard
    grown by the factor, so that one shard holds what the blocks above it held and the
    pyramid takes few files. At most the level's shape."""
    grown = [b * f for b, f in zip(base, factor, strict=True)] if zarr_format == 3 else base
    return tuple(max(1, min(int(g), s)) for g, s in zip(grown, shape, strict=True))


def inner_chunks(shard: Sequence[int]) -> tuple[int, ...]:
    """The inner chunks of a shard: per axis, the largest divisor of its side up to
    :data:`INNER_CHUNK` where that is at least half of it, else the whole side."""
    chunks = []
    for side in shard:
        divisor = next(d for d in range(min(side, INNER_CHUNK), 0, -1) if side % d == 0)
        chunks.append(divisor if side <= INNER_CHUNK or 2 * divisor >= INNER_CHUNK else side)
    return tuple(chunks)


def create_level0(
    group: zarr.Group,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: np.dtype | str,
    fill_value: Any = 0,
    filters: Sequence[dict[str, Any]] | None = None,
    name: str = "0",
    dimension_names: Sequence[str] | None = None,
) -> zarr.Array:
    """Create the full-resolution array "0" (or ``name``) of an image group, written in
    ``chunks`` (whole files: zarr v2 chunks, or zarr v3 shards of :func:`inner_chunks`),
    compressed with :data:`COMPRESSOR` after ``filters`` (numcodecs configurations, e.g.
    ``{"id": "delta", "dtype": "u1"}``). ``dimension_names`` (the axes) are kept in zarr v3."""
    chunks = tuple(int(c) for c in chunks)
    if group.metadata.zarr_format == 2:
        return group.create_array(
            name,
            shape=tuple(shape),
            chunks=chunks,
            dtype=dtype,
            fill_value=fill_value,
            overwrite=True,
            chunk_key_encoding={"name": "v2", "separator": "/"},
            compressors=_numcodec(COMPRESSOR),
            filters=[_numcodec(f) for f in filters] if filters else None,
        )
    return group.create_array(
        name,
        shape=tuple(shape),
        chunks=inner_chunks(chunks),
        shards=chunks,
        dtype=dtype,
        fill_value=fill_value,
        overwrite=True,
        compressors=_zarr3_codec(COMPRESSOR),
        filters=[_zarr3_codec(f) for f in filters] if filters else None,
        dimension_names=tuple(dimension_names) if dimension_names else None,
    )


def _numcodec(config: dict[str, Any]) -> Any:
    import numcodecs

    return numcodecs.get_codec(dict(config))


def _zarr3_codec(config: dict[str, Any]) -> Any:
    """A numcodecs configuration as a zarr v3 codec: Blosc as the specification's own codec,
    others (e.g. delta) through numcodecs' zarr v3 wrappers."""
    options = {k: v for k, v in config.items() if k != "id"}
    if config["id"] == "blosc":
        shuffle = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}[options["shuffle"]]
        return zarr.codecs.BloscCodec(
            cname=options["cname"], clevel=options["clevel"], shuffle=shuffle
        )
    from zarr.codecs.numcodecs import Delta

    wrappers = {"delta": Delta}
    return wrappers[config["id"]](**options)


def _downsample(data: da.Array, axes: str, method: str) -> da.Array:
    """One pyramid step, 2x in y and x, chunk by chunk: ``nearest`` takes every second pixel
    (label values stay label values); ``resize`` is ome-zarr-py's own anti-aliased method
    (``ome_zarr.scale.Methods.RESIZE``: ``skimage.transform.resize``, a Gaussian of sigma 0.5
    pixels then bilinear; reflected at chunk borders), to floor(size / 2)."""
    if method == "nearest":
        return data[tuple(slice(None, None, 2 if a in "yx" else 1) for a in axes)]
    from ome_zarr.scale import Methods, method_dispatch

    resize = method_dispatch[Methods.RESIZE]
    shape = tuple(s // 2 if a in "yx" else s for a, s in zip(axes, data.shape, strict=True))
    return resize["func"](data, output_shape=shape, **resize["kwargs"])


def _pyramid_type(method: str) -> tuple[str, dict[str, Any]]:
    """The multiscales ``type`` and ``metadata`` (NGFF: how the pyramid was made)."""
    if method == "nearest":
        return "nearest", {"description": "every second pixel in y and x (strided slicing)"}
    import skimage
    from ome_zarr.scale import Methods, method_dispatch

    resize = method_dispatch[Methods.RESIZE]
    return Methods.RESIZE.value, {
        "description": "anti-aliased 2x downsampling in y and x, chunk by chunk (ome-zarr-py)",
        "method": str(resize["used_function"]),
        "version": skimage.__version__,
        "kwargs": dict(resize["kwargs"]),
    }


def _level_translation(space: Space, factor: Sequence[int], method: str) -> list[float]:
    """The physical position of a level's first pixel centre: that of its first full-resolution
    pixel for ``nearest``; the centre of the first ``factor`` pixels for ``resize``."""
    if method == "nearest":
        return [float(t) for t in space.translation]
    return [
        float(t + s * (f - 1) / 2)
        for t, s, f in zip(space.translation, space.scale, factor, strict=True)
    ]


def finish_multiscale(
    group: zarr.Group,
    axes: str | Space,
    scale: Sequence[float] | None,
    name: str,
    levels: int | None = None,
    method: str = "resize",
    omero: dict[str, Any] | None = None,
) -> None:
    """Build the pyramid of ``group``'s array "0" and write its NGFF metadata: axes (with units),
    scale and translation per level, the pyramid's ``type``, and ``omero`` (completed where a
    channel lacks a colour or a window) if given.

    ``axes`` is an axis string (scale ``scale``, translation 0, no units) or a :class:`Space`.
    ``method`` is ``resize`` (anti-aliased, for images) or ``nearest`` (for labels). Each level
    is computed lazily from the one above with Dask and written chunk by chunk.
    """
    space = axes if isinstance(axes, Space) else Space.plain(axes, scale)
    base = group["0"]
    factors = pyramid_factors(base.shape, space.axes, levels)
    base_chunks = write_chunks(base)
    previous = da.from_zarr(base, chunks=base_chunks)
    datasets = []
    for level, factor in enumerate(factors):
        if level > 0:
            data = _downsample(previous, space.axes, method)
            chunks = level_chunks(base_chunks, factor, data.shape, group.metadata.zarr_format)
            target = create_level0(
                group,
                data.shape,
                chunks,
                base.dtype,
                base.fill_value,
                name=str(level),
                dimension_names=tuple(space.axes),
            )
            da.store(data.rechunk(chunks), target, lock=False)
            previous = da.from_zarr(target, chunks=chunks)
        level_scale = [float(s) * f for s, f in zip(space.scale, factor, strict=True)]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": level_scale}]
        translation = _level_translation(space, factor, method)
        if any(translation):
            transforms.append({"type": "translation", "translation": translation})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    write_multiscales_metadata(
        group, datasets, fmt=_ngff_format(group), axes=space.axes_metadata(), name=name
    )
    attrs = ngff_attrs(group)
    kind, details = _pyramid_type(method)
    attrs["multiscales"][0]["type"] = kind
    attrs["multiscales"][0]["metadata"] = details
    if omero is not None and "c" in space.axes:
        attrs["omero"] = complete_omero(omero, previous, space.axes)
    put_ngff_attrs(group, attrs)


#: Colours of channels an ``omero`` entry leaves without one (then cycled).
_CHANNEL_COLOURS = ("00FF00", "FF00FF", "00FFFF", "FFFF00", "FF0000", "0000FF", "FFFFFF")


def complete_omero(omero: dict[str, Any], smallest: da.Array, axes: str) -> dict[str, Any]:
    """``omero`` with every channel given a colour (hex RGB) and a display window, as NGFF 0.4
    requires: a missing window is the value range of the channel in ``smallest`` (the
    smallest pyramid level, a cheap read)."""
    omero = json.loads(json.dumps(omero))
    channel_axis = axes.index("c")
    ranges: list[tuple[float, float]] | None = None
    for index, channel in enumerate(omero["channels"]):
        colour = channel.get("color")
        if not (isinstance(colour, str) and len(colour) == 6 and _is_hex(colour)):
            channel["color"] = _CHANNEL_COLOURS[index % len(_CHANNEL_COLOURS)]
        window = channel.get("window")
        keys = ("min", "max", "start", "end")
        if not (
            isinstance(window, dict) and all(isinstance(window.get(k), int | float) for k in keys)
        ):
            if ranges is None:
                other = tuple(i for i in range(smallest.ndim) if i != channel_axis)
                low, high = da.compute(smallest.min(axis=other), smallest.max(axis=other))
                ranges = [(float(a), float(b)) for a, b in zip(low, high, strict=True)]
            low_value, high_value = ranges[index]
            channel["window"] = {
                "min": low_value,
                "max": high_value,
                "start": low_value,
                "end": high_value,
            }
    return omero


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def write_image(
    path_or_group: str | os.PathLike[str] | zarr.Group,
    data: da.Array,
    axes: str | Space,
    scale: Sequence[float] | None,
    name: str,
    chunks: Sequence[int] | None = None,
    omero: dict[str, Any] | None = None,
    ngff_version: str = NGFF_VERSION,
) -> zarr.Group:
    """Write a Dask array as an NGFF image with an anti-aliased pyramid, chunk by chunk (a new
    store at a path in ``ngff_version``; a given group in its own version)."""
    if isinstance(path_or_group, str | os.PathLike | Location):
        group = create_group(path_or_group, ngff_version)
    else:
        group = path_or_group
    chunks = tuple(chunks) if chunks is not None else tuple(c[0] for c in data.chunks)
    names = axes.axes if isinstance(axes, Space) else axes
    target = create_level0(group, data.shape, chunks, data.dtype, dimension_names=tuple(names))
    da.store(data.rechunk(chunks), target, lock=False)
    finish_multiscale(group, axes, scale, name, omero=omero)
    return group


def label_dtype(max_label: int) -> np.dtype:
    """uint32 for labels, uint64 when the count needs it."""
    return np.dtype(np.uint32) if max_label <= np.iinfo(np.uint32).max else np.dtype(np.uint64)


def label_axes_shape(image: OmeImage) -> tuple[str, tuple[int, ...]]:
    """Axes and shape of a label image for ``image``: the image's axes less ``c`` (as
    ome-zarr-py's own sample data has them; NGFF allows either), so that viewers, which align
    the axes of layers from the right, put the labels' ``t`` on the image's ``t``."""
    kept = [(a, s) for a, s in zip(image.axes, image.data.shape, strict=True) if a != "c"]
    return "".join(a for a, _ in kept), tuple(s for _, s in kept)


def label_space(image: OmeImage) -> Space:
    """The physical space of a label image for ``image``: the image's less ``c``."""
    return image.space.without("c")


def label_colours(count: int) -> list[dict[str, Any]]:
    """``image-label`` colours for the IDs 1..count: hues a golden angle apart (neighbouring
    IDs, often neighbouring objects, get distinct colours), opaque."""
    import colorsys

    colours = []
    for value in range(1, count + 1):
        hue = (value * 0.6180339887498949) % 1.0
        red, green, blue = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
        rgba = [round(255 * red), round(255 * green), round(255 * blue), 255]
        colours.append({"label-value": value, "rgba": rgba})
    return colours


def create_labels(
    root: zarr.Group,
    name: str,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: np.dtype | str = np.uint32,
    axes: str | None = None,
) -> zarr.Group:
    """Create ``labels/<name>`` (empty level 0, on ``axes`` if given) inside an image group; it
    is listed once finished (:func:`finish_labels`)."""
    labels_group = root.require_group("labels")
    label_group = labels_group.create_group(name, overwrite=True)
    create_level0(label_group, shape, chunks, dtype, dimension_names=axes)
    return label_group


def finish_labels(
    root: zarr.Group,
    name: str,
    axes: str | Space,
    scale: Sequence[float] | None,
    colours: list[dict[str, Any]] | None = None,
) -> None:
    """Write the nearest-neighbour pyramid and the ``image-label`` metadata of a label image
    (with ``colours``, a list of ``{"label-value", "rgba"}``, if given)."""
    labels_group = root["labels"]
    finish_multiscale(labels_group[name], axes, scale, name, method="nearest")
    unlist_labels(root, name)  # listed once, even where a run is finished again
    # lists ``name`` in the labels group's "labels" attribute
    write_label_metadata(
        labels_group, name, colors=colours, fmt=_ngff_format(root), source={"image": "../../"}
    )
    # ome-zarr-py 0.18 leaves the version out of an NGFF 0.5 labels group, which the
    # specification (and ome-zarr-models) require: written again, with it
    if labels_group.metadata.zarr_format == 3:
        put_ngff_attrs(labels_group, ngff_attrs(labels_group))


def unlist_labels(root: zarr.Group, name: str) -> None:
    """Remove ``name`` from the ``labels`` group's list of label images, if it is there."""
    if "labels" not in root:
        return
    group = root["labels"]
    attrs = ngff_attrs(group)
    listed = attrs.get("labels")
    if isinstance(listed, list) and name in listed:
        attrs["labels"] = [n for n in listed if n != name]
        put_ngff_attrs(group, attrs)


def check_labels_writable(
    path: str | os.PathLike[str] | Location, name: str, overwrite: bool
) -> None:
    """Refuse to write ``labels/<name>`` into the image at ``path`` where it exists (unless
    ``overwrite``), or where it is not an OME-Zarr image group one can write to."""
    path = Location.of(path)
    node = _open_zarr(path)
    if not isinstance(node, zarr.Group) or "multiscales" not in _ngff_attrs(node)[0]:
        raise UserInputError(
            f"--into-input writes labels into an OME-Zarr image, but {path} is not one",
            "write a new output instead: predict IMAGE OUTPUT",
        )
    if (path / "labels" / name).exists() and not overwrite:
        raise UserInputError(
            f"{path} already holds labels/{name}",
            "pass --overwrite to replace them, or write a new output: predict IMAGE OUTPUT",
        )
    labels = path / "labels" if (path / "labels").exists() else path
    if not labels.remote and not os.access(labels, os.W_OK):
        raise UserInputError(
            f"{labels} is not writable", "write a new output instead: predict IMAGE OUTPUT"
        )


def write_labels(
    root: zarr.Group,
    name: str,
    labels: da.Array,
    axes: str | Space,
    scale: Sequence[float] | None,
    chunks: Sequence[int] | None = None,
) -> zarr.Group:
    """Write a Dask array of instance labels as ``labels/<name>`` with a nearest pyramid."""
    chunks = tuple(chunks) if chunks is not None else tuple(c[0] for c in labels.chunks)
    names = axes.axes if isinstance(axes, Space) else axes
    group = create_labels(root, name, labels.shape, chunks, labels.dtype, names)
    da.store(labels.rechunk(chunks), group["0"], lock=False)
    finish_labels(root, name, axes, scale)
    return group


# --- run status: an output that is incomplete must never look complete ------------------------


def mark_status(group: zarr.Group, status: str, **details: Any) -> None:
    """Record the run status ('incomplete' or 'complete') and details in the root attributes."""
    current = dict(group.attrs.get(STATUS_KEY, {}))
    current.update(details)
    current["status"] = status
    group.attrs[STATUS_KEY] = json.loads(json.dumps(current))


def run_status(path: str | os.PathLike[str] | Location) -> dict[str, Any]:
    """The run status recorded in a store written by cellulus-scale ({} for other stores)."""
    node = _open_zarr(Location.of(path))
    return dict(node.attrs.get(STATUS_KEY, {})) if isinstance(node, zarr.Group) else {}


def check_complete(path: str | os.PathLike[str] | Location, command: str = "predict") -> None:
    """Refuse a store that a run left incomplete, saying how to finish it."""
    status = run_status(path)
    if status.get("status") == "incomplete":
        run = status.get("command", command)
        if status.get("stopped"):
            raise UserInputError(
                f"{path} is incomplete: a {run} run stopped on {status['stopped']}",
                "fix that, then finish it by rerunning the same command with --resume",
            )
        raise UserInputError(
            f"{path} is incomplete: a {run} run was interrupted",
            "finish it by rerunning the same command with --resume",
        )


def sample_frames(image: OmeImage, count: int) -> np.ndarray:
    """Up to ``count`` evenly spaced frame indices of the image."""
    frames = image.canonical_shape[0]
    return np.unique(np.linspace(0, frames - 1, min(frames, count)).round().astype(int))


def sample_region(image: OmeImage, frame: int, side: int, depth: int) -> np.ndarray:
    """The central crop of ``frame`` (at most ``side`` pixels per in-plane axis and ``depth``
    planes), as (C, *spatial) float32: a cheap look at a large image."""
    _, _, planes, height, width = image.canonical_shape
    boxes = []
    for size, limit in ((planes, depth), (height, side), (width, side)):
        extent = min(size, limit)
        start = (size - extent) // 2
        boxes.append(slice(start, start + extent))
    data = image.canonical()[frame][(slice(None), *boxes)]
    values = np.asarray(data.compute(scheduler="synchronous"), dtype=np.float32)
    return values if image.spatial_dims == 3 else values[:, 0]


def check_sample_finite(image: OmeImage, frames: int = 8, side: int = 512) -> None:
    """Refuse a floating-point image with NaN or Inf in a cheap sample of it (central crops of
    a few frames), before anything is written; a run still checks every block it reads."""
    if image.data.dtype.kind != "f":
        return
    for frame in sample_frames(image, frames):
        values = sample_region(image, int(frame), side, side)
        if not np.all(np.isfinite(values)):
            found = " and ".join(
                name for name, test in (("NaN", np.isnan), ("Inf", np.isinf)) if test(values).any()
            )
            raise UserInputError(
                f"frame {frame} of {image.path} contains {found} values",
                "replace them (e.g. with 0) before predicting",
            )


def chunk_grid(shape: Sequence[int], chunks: Sequence[int]) -> list[tuple[slice, ...]]:
    """All chunk-aligned regions of an array, as tuples of slices."""
    ranges = [range(math.ceil(s / c)) for s, c in zip(shape, chunks, strict=True)]
    regions = []
    for index in np.ndindex(*[len(r) for r in ranges]):
        regions.append(
            tuple(
                slice(i * c, min((i + 1) * c, s))
                for i, c, s in zip(index, chunks, shape, strict=True)
            )
        )
    return regions


def damaged_chunks(image: OmeImage, frame: int, box: Sequence[slice]) -> list[str]:
    """The chunks of ``frame`` inside the spatial ``box`` ((y, x) or (z, y, x) slices) that
    cannot be read, each named by its pixel ranges ('y 0:64, x 64:128'), to name in an error."""
    data = image.canonical()[frame]
    grids = []
    for chunks, want in zip(data.chunks[-len(box) :], box, strict=True):
        edges = np.concatenate([[0], np.cumsum(chunks)])
        grids.append(
            [
                slice(int(a), int(b))
                for a, b in zip(edges[:-1], edges[1:], strict=True)
                if a < want.stop and b > want.start
            ]
        )
    damaged = []
    for chunk in itertools.product(*grids):
        try:
            data[(Ellipsis, *chunk)].compute(scheduler="synchronous")
        except Exception:
            named = zip(SPATIAL_AXES[-len(box) :], chunk, strict=True)
            damaged.append(", ".join(f"{a} {s.start}:{s.stop}" for a, s in named))
    return damaged
