"""Tests for PNG previews."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread
from skimage.segmentation import find_boundaries

from cellulus_scale.errors import UserInputError
from cellulus_scale.viz.preview import outline_palette, preview_rgb, render_preview


def _scene(shape=(300, 320)):
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 5.0, shape)
    labels = np.zeros(shape, np.uint64)
    labels[20:120, 30:150] = 7
    labels[20:120, 150:260] = 8  # touching neighbour with a consecutive ID
    labels[180:280, 40:120] = 2**40 + 3
    image[labels > 0] += 100.0
    return image, labels


def _read_rgb(path):
    png = imread(path)
    assert png.dtype == np.float32
    return png[..., :3]


def test_outline_colours_at_boundaries(tmp_path):
    image, labels = _scene()
    path = tmp_path / "preview.png"
    render_preview(image, labels, path)
    rgb = _read_rgb(path)
    assert rgb.shape[:2] == labels.shape
    palette = outline_palette()
    edges = find_boundaries(labels, mode="inner")
    for obj in (7, 8, 2**40 + 3):
        mask = edges & (labels == obj)
        expected = palette[obj % len(palette)]
        np.testing.assert_allclose(rgb[mask], np.broadcast_to(expected, (mask.sum(), 3)), atol=0.01)
    assert not np.allclose(palette[7 % len(palette)], palette[8 % len(palette)], atol=0.1)
    # Interior and background pixels are grey.
    interior = (labels > 0) & ~edges
    grey = rgb[interior | (labels == 0)]
    np.testing.assert_allclose(grey[:, 0], grey[:, 1], atol=0.01)
    np.testing.assert_allclose(grey[:, 1], grey[:, 2], atol=0.01)
    assert rgb[60, 60].mean() > 0.6 and rgb[150, 10].mean() < 0.4


def test_palette_has_no_greys():
    palette = outline_palette()
    assert len(palette) == 18
    assert np.all(palette.max(axis=1) - palette.min(axis=1) > 0.1)


def test_small_image_is_enlarged(tmp_path):
    labels = np.zeros((32, 40), np.uint16)
    labels[4:20, 4:20] = 1
    image = labels.astype(float)
    path = tmp_path / "small.png"
    render_preview(image, labels, path)
    rgb = _read_rgb(path)
    zoom = 256 // 40
    assert rgb.shape[:2] == (32 * zoom, 40 * zoom)
    expected = preview_rgb(image, labels)
    np.testing.assert_allclose(rgb[::zoom, ::zoom], expected, atol=0.01)


def test_3d_uses_middle_slice_and_title(tmp_path):
    labels = np.zeros((5, 300, 300), np.uint32)
    labels[2, 50:150, 50:150] = 3  # only the middle slice has an object
    image = np.zeros(labels.shape)
    image[2] = labels[2] > 0
    path = tmp_path / "volume.png"
    render_preview(image, labels, path, title="frame 0")
    png = _read_rgb(path)
    assert png.shape[:2] == (300 + 24, 300)
    rgb = png[24:]
    colour = outline_palette()[3]
    np.testing.assert_allclose(rgb[50, 100], colour, atol=0.01)
    np.testing.assert_allclose(rgb[100, 50], colour, atol=0.01)
    assert rgb[100, 100].mean() > 0.9  # interior: bright grey
    assert png[:24].min() < 0.5  # some dark title text in the band


def test_constant_image_and_no_labels(tmp_path):
    path = tmp_path / "flat.png"
    render_preview(np.full((260, 260), 3.0), np.zeros((260, 260), np.uint8), path)
    assert _read_rgb(path).shape == (260, 260, 3)


def test_bad_input(tmp_path):
    with pytest.raises(UserInputError):
        render_preview(np.zeros((10, 10)), np.zeros((10, 11), np.uint8), tmp_path / "x.png")
    with pytest.raises(UserInputError):
        render_preview(np.zeros((2, 2, 2, 2)), np.zeros((2, 2, 2, 2), np.uint8), tmp_path / "x.png")
    with pytest.raises(UserInputError):
        render_preview(np.zeros((10, 10)), np.zeros((10, 10)), tmp_path / "x.png")
