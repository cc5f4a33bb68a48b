"""Tests for PNG previews."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import ndimage
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
    zoom = 768 // 320  # enlarged until the long side reaches 768 px
    assert rgb.shape[:2] == (300 * zoom, 320 * zoom)
    np.testing.assert_allclose(rgb, preview_rgb(image, labels, zoom), atol=0.01)
    big = np.repeat(np.repeat(labels, zoom, axis=0), zoom, axis=1)
    palette = outline_palette()
    edges = find_boundaries(big, mode="inner")
    for obj in (7, 8, 2**40 + 3):
        mask = edges & (big == obj)
        expected = palette[obj % len(palette)]
        np.testing.assert_allclose(rgb[mask], np.broadcast_to(expected, (mask.sum(), 3)), atol=0.01)
        # two pixels wide: the pixels just inside the outline are coloured too
        inner = find_boundaries(np.where(mask, 0, big) == obj, mode="inner") & (big == obj)
        assert np.allclose(rgb[inner & ~mask], expected, atol=0.01)
    assert not np.allclose(palette[7 % len(palette)], palette[8 % len(palette)], atol=0.1)
    # Interior and background pixels are grey.
    core = (big > 0) & ~ndimage.binary_dilation(find_boundaries(big), iterations=3)
    grey = rgb[core | (big == 0)]
    np.testing.assert_allclose(grey[:, 0], grey[:, 1], atol=0.01)
    np.testing.assert_allclose(grey[:, 1], grey[:, 2], atol=0.01)
    assert rgb[120, 120].mean() > 0.6 and rgb[300, 20].mean() < 0.4


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
    zoom = 768 // 40
    assert rgb.shape[:2] == (32 * zoom, 40 * zoom)
    np.testing.assert_allclose(rgb, preview_rgb(image, labels, zoom), atol=0.01)


def test_3d_uses_middle_slice_and_title(tmp_path):
    labels = np.zeros((5, 300, 300), np.uint32)
    labels[2, 50:150, 50:150] = 3  # only the middle slice has an object
    image = np.zeros(labels.shape)
    image[2] = labels[2] > 0
    path = tmp_path / "volume.png"
    render_preview(image, labels, path, title="frame 0")
    png = _read_rgb(path)
    assert png.shape[:2] == (600 + 24, 600)
    rgb = png[24:]
    colour = outline_palette()[3]
    np.testing.assert_allclose(rgb[100, 200], colour, atol=0.01)
    np.testing.assert_allclose(rgb[200, 100], colour, atol=0.01)
    assert rgb[200, 200].mean() > 0.9  # interior: bright grey
    assert png[:24].min() < 0.5  # some dark title text in the band


def test_the_ground_truth_is_drawn_beside(tmp_path):
    image, labels = _scene()
    truth = np.zeros_like(labels)
    truth[30:110, 40:140] = 5
    path = tmp_path / "both.png"
    render_preview(image, labels, path, title="t=0", truth=truth)
    png = _read_rgb(path)
    zoom, width = 2, 640
    assert png.shape[:2] == (24 + 300 * zoom, 2 * width + 8)
    np.testing.assert_allclose(png[24:, :width], preview_rgb(image, labels, zoom), atol=0.01)
    np.testing.assert_allclose(png[24:, width + 8 :], preview_rgb(image, truth, zoom), atol=0.01)
    assert np.all(png[24:, width : width + 8] > 0.99)  # a white gap between the panels


def test_constant_image_and_no_labels(tmp_path):
    path = tmp_path / "flat.png"
    render_preview(np.full((260, 260), 3.0), np.zeros((260, 260), np.uint8), path)
    assert _read_rgb(path).shape == (520, 520, 3)


def test_bad_input(tmp_path):
    with pytest.raises(UserInputError):
        render_preview(np.zeros((10, 10)), np.zeros((10, 11), np.uint8), tmp_path / "x.png")
    with pytest.raises(UserInputError):
        render_preview(np.zeros((2, 2, 2, 2)), np.zeros((2, 2, 2, 2), np.uint8), tmp_path / "x.png")
    with pytest.raises(UserInputError):
        render_preview(np.zeros((10, 10)), np.zeros((10, 10)), tmp_path / "x.png")
