"""Tests for the Otsu + watershed baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import disk
from skimage.filters import threshold_otsu

from cellulus_scale.errors import UserInputError
from cellulus_scale.kernels import watershed as baseline
from cellulus_scale.kernels.watershed import min_object_size, otsu_from_histogram, watershed_labels


def _two_touching_discs() -> np.ndarray:
    image = np.zeros((64, 80))
    image[disk((32, 28), 11, shape=image.shape)] = 1.0
    image[disk((32, 48), 11, shape=image.shape)] = 1.0  # centres 20 px apart: the discs overlap
    image[5:7, 70:72] = 4.0  # a bright 2 x 2 speck: 12 px above 0.5 after blurring
    return ndimage.gaussian_filter(image, 1.5)


def test_touching_discs_split_and_speck_removed():
    image = _two_touching_discs()
    labels = watershed_labels(image, threshold=0.5, diameter=22)
    assert labels.dtype == np.uint32
    assert labels.shape == image.shape
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    speck = image[:15, 62:] > 0.5
    assert 0 < speck.sum() < min_object_size(22, 2)
    assert labels[:15, 62:].max() == 0  # speck removed
    left, right = labels[32, 28], labels[32, 48]
    assert left > 0 and right > 0 and left != right
    # The cut runs close to the midline between the discs.
    for obj, centre in ((left, 28), (right, 48)):
        cols = np.nonzero(labels == obj)[1]
        assert abs(cols.mean() - centre) < 2.5
    # Every foreground pixel of the discs is assigned.
    assert np.all(labels[(image > 0.5) & (np.arange(80) > 15)[None, :] & (np.arange(80) < 60)])


def test_deterministic():
    image = _two_touching_discs()
    a = watershed_labels(image, 0.5, 22)
    b = watershed_labels(image.copy(), 0.5, 22)
    np.testing.assert_array_equal(a, b)


def test_small_diameter_keeps_speck():
    image = _two_touching_discs()
    labels = watershed_labels(image, threshold=0.5, diameter=2)
    assert labels[5:7, 70:72].min() > 0
    assert len(np.unique(labels[:15, 62:])) == 2


def test_empty_foreground():
    labels = watershed_labels(np.zeros((10, 12)), threshold=0.5, diameter=5)
    assert labels.dtype == np.uint32 and not labels.any()


def test_3d_balls():
    zz, yy, xx = np.mgrid[:24, :32, :48]
    image = ((zz - 12) ** 2 + (yy - 16) ** 2 + (xx - 14) ** 2 <= 64).astype(float)
    image += (zz - 12) ** 2 + (yy - 16) ** 2 + (xx - 30) ** 2 <= 64
    image = ndimage.gaussian_filter(np.minimum(image, 1.0), 1.0)
    labels = watershed_labels(image, 0.5, 16)
    assert labels.shape == image.shape
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    assert labels[12, 16, 14] != labels[12, 16, 30]


def test_3d_balls_stacked_in_z_on_anisotropic_voxels():
    """Two touching balls (radius 8 px) one above the other on planes 4 px apart: 4 planes
    between their centres. With the voxel size the watershed sees 16 px and splits them; taken
    as cubic voxels, the seeds' separation (d/2 = 8 voxels) joins them."""
    spacing = (4.0, 1.0, 1.0)
    zz, yy, xx = np.mgrid[:12, :32, :32]
    z = zz * spacing[0]
    image = ((z - 14) ** 2 + (yy - 16) ** 2 + (xx - 16) ** 2 <= 64).astype(float)
    image += (z - 30) ** 2 + (yy - 16) ** 2 + (xx - 16) ** 2 <= 64
    image = np.minimum(image, 1.0)
    physical = watershed_labels(image, 0.5, 16, spacing)
    assert sorted(np.unique(physical).tolist()) == [0, 1, 2]
    assert physical[3, 16, 16] != physical[7, 16, 16]  # planes at z = 12 and 28 px
    assert np.unique(watershed_labels(image, 0.5, 16)).tolist() == [0, 1]
    assert min_object_size(16, 3, spacing) == pytest.approx(min_object_size(16, 3) / 4)


def test_every_component_gets_a_seed(monkeypatch):
    def no_peaks(image, **kwargs):
        return np.empty((0, image.ndim), dtype=np.intp)

    monkeypatch.setattr(baseline, "peak_local_max", no_peaks)
    image = np.zeros((30, 30))
    image[2:10, 2:10] = 1
    image[15:25, 12:28] = 1
    labels = watershed_labels(image, 0.5, 6)
    components, n = ndimage.label(image > 0.5)
    assert n == 2
    assert labels.max() == 2
    np.testing.assert_array_equal(labels > 0, components > 0)


def test_min_object_size():
    assert min_object_size(10, 2) == pytest.approx(0.1 * math.pi * 25)
    assert min_object_size(10, 3) == pytest.approx(0.1 * 4 / 3 * math.pi * 125)


def test_otsu_from_histogram_matches_image_otsu():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(10, 2, 5000), rng.normal(40, 5, 2000)])
    counts, edges = np.histogram(values, bins=256)
    threshold = otsu_from_histogram(counts, edges)
    assert 15 < threshold < 35
    assert threshold == pytest.approx(threshold_otsu(values, nbins=256), abs=edges[1] - edges[0])


def test_otsu_degenerate_histograms():
    assert otsu_from_histogram(np.array([0, 7, 0]), np.array([0.0, 1.0, 2.0, 3.0])) == 2.0
    with pytest.raises(UserInputError):
        otsu_from_histogram(np.zeros(3), np.arange(4.0))
    with pytest.raises(UserInputError):
        otsu_from_histogram(np.ones(3), np.arange(3.0))


def test_bad_input():
    with pytest.raises(UserInputError):
        watershed_labels(np.zeros((2, 3, 4, 5)), 0.5, 5)
    with pytest.raises(UserInputError):
        watershed_labels(np.zeros((8, 8)), 0.5, 0)
    with pytest.raises(UserInputError):
        watershed_labels(np.zeros((8, 8)), float("nan"), 4)
