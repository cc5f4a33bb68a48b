"""PNG previews: a grey image with coloured instance outlines, and beside it, where there is
one, the ground truth drawn the same way.

Rendering uses :class:`matplotlib.figure.Figure` with the Agg canvas directly (no pyplot, no GUI
backend), and places the image pixels 1:1 (after integer up/down-scaling), so outline colours
in the PNG are exactly the palette colours. Small frames are enlarged so that a person sees the
objects at a glance, and outlines are two pixels wide at the PNG's resolution.
"""

from __future__ import annotations

import os

import numpy as np
from skimage.segmentation import find_boundaries

from cellulus_scale.errors import UserInputError

# Strong tab20 hues first, then their light partners; the two greys (14, 15) are left out so
# no outline is grey on the grey image. Neighbouring IDs get different colours.
_TAB20_ORDER = (0, 2, 4, 6, 8, 10, 12, 16, 18, 1, 3, 5, 7, 9, 11, 13, 17, 19)
_DPI = 100
_MIN_SIDE = 768  # small images are enlarged (integer factor) until the long side reaches this
_MAX_SIDE = 4096  # large images are subsampled (integer stride) below this
_TITLE_PX = 24
_GAP_PX = 8  # white gap between the panels
_OUTLINE_PX = 2  # outline width in the PNG


def outline_palette() -> np.ndarray:
    """The outline colours, shape ``(n, 3)`` RGB in [0, 1]; label ``k`` uses ``k % n``."""
    from matplotlib import colormaps

    colors = np.asarray(colormaps["tab20"].colors, dtype=float)
    return colors[list(_TAB20_ORDER), :3]


def outline_colors(labels: np.ndarray) -> np.ndarray:
    """Per-pixel outline colour ``(..., 3)`` for a label image (cycled by label ID)."""
    palette = outline_palette()
    labels = np.asarray(labels)
    index = (labels % labels.dtype.type(len(palette))).astype(np.intp)
    return palette[index]


def _frame_2d(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes; for 3D input return the middle z slice (index ``shape[0] // 2``)."""
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.shape != labels.shape:
        raise UserInputError(
            f"labels shape {labels.shape} differs from image shape {image.shape}",
            "pass the labels computed for this image",
        )
    if image.ndim not in (2, 3):
        raise UserInputError(
            f"preview needs a 2D or 3D frame, got {image.ndim} dimensions",
            "pass one frame (one time point, one channel)",
        )
    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    if labels.dtype.kind not in "iu":
        raise UserInputError(
            f"labels have dtype {labels.dtype}, not an integer type",
            "pass instance labels (integer IDs, 0 = background)",
        )
    if image.ndim == 3:
        middle = image.shape[0] // 2
        image, labels = image[middle], labels[middle]
    return image, labels


def _grey(image: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] between the 1st and 99.8th percentiles (NaN/inf shown black)."""
    image = np.asarray(image, dtype=float)
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros(image.shape)
    lo, hi = np.percentile(image[finite], [1.0, 99.8])
    if hi <= lo:
        return np.where(finite & (image > lo), 1.0, 0.0)
    return np.clip(np.where(finite, (image - lo) / (hi - lo), 0.0), 0.0, 1.0)


def preview_rgb(image: np.ndarray, labels: np.ndarray, zoom: int = 1) -> np.ndarray:
    """RGB float array in [0, 1] of the preview, enlarged ``zoom`` times (nearest), with
    outlines :data:`_OUTLINE_PX` wide inside each object at that resolution."""
    image, labels = _frame_2d(image, labels)
    if zoom > 1:
        image = np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1)
        labels = np.repeat(np.repeat(labels, zoom, axis=0), zoom, axis=1)
    rgb = np.repeat(_grey(image)[..., None], 3, axis=-1)
    edges = find_boundaries(labels, mode="inner") & (labels != 0)
    for _ in range(_OUTLINE_PX - 1):  # thicken inwards: the outline stays inside its object
        grown = edges.copy()
        for axis in (0, 1):
            for shift in (1, -1):
                moved = np.roll(edges, shift, axis=axis)
                same = np.roll(labels, shift, axis=axis) == labels
                grown |= moved & same & (labels != 0)
        edges = grown
    rgb[edges] = outline_colors(labels[edges])
    return rgb


def render_preview(
    image: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike,
    title: str | None = None,
    truth: np.ndarray | None = None,
    names: tuple[str, str] = ("segmentation", "ground truth"),
) -> None:
    """Save a PNG of a 2D frame in grey with instance outlines in colour; with ``truth``, a
    second panel of the same frame with the ground truth's outlines, side by side.

    The grey range is the 1st to 99.8th percentile. For 3D input the middle z slice
    (``shape[0] // 2``) is shown. Outline colours come from tab20 (greys excluded), cycled by
    label ID. Images with a long side under 768 px are enlarged by an integer factor (nearest);
    above 4096 px labels and image are subsampled with an integer stride before outlining. A
    title (and, with ``truth``, the panel ``names``) is written in a 24 px band above.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frames = [_frame_2d(image, labels)]
    if truth is not None:
        frames.append(_frame_2d(image, truth))
    long_side = max(frames[0][0].shape)
    stride = -(-long_side // _MAX_SIDE) if long_side > _MAX_SIDE else 1
    zoom = max(1, _MIN_SIDE // max(long_side, 1))
    panels = [
        preview_rgb(i[::stride, ::stride], lab[::stride, ::stride], zoom) for i, lab in frames
    ]
    height, width = panels[0].shape[:2]
    total = width * len(panels) + _GAP_PX * (len(panels) - 1)
    band = _TITLE_PX if title or truth is not None else 0
    fig = Figure(figsize=(total / _DPI, (height + band) / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    for index, panel in enumerate(panels):
        fig.figimage(panel, xo=index * (width + _GAP_PX), yo=0, origin="upper", resize=False)
    y = 1.0 - 0.5 * band / (height + band)
    if truth is not None:
        for index, name in enumerate(names):
            label = f"{title}: {name}" if title and index == 0 else name
            centre = (index * (width + _GAP_PX) + width / 2) / total
            fig.text(centre, y, label, ha="center", va="center", fontsize=10, color="black")
    elif title:
        fig.text(0.5, y, title, ha="center", va="center", fontsize=10, color="black")
    fig.savefig(os.fspath(path), format="png", dpi=_DPI)
