"""Tests of the nuclei time-lapse simulator kernel (cellulus_scale.simulation.simulate)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from cellulus_scale.errors import UserInputError
from cellulus_scale.simulation.simulate import SimulationSpec, ground_truth_centres, simulate_frames

SMALL_2D = {"shape": (96, 96), "diameter": 16.0}
SMALL_3D = {"shape": (24, 64, 64), "diameter": 12.0}


def run(**kwargs: object) -> list[tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]:
    return list(simulate_frames(SimulationSpec(**kwargs)))


def label_sizes(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels.ravel())
    return counts[1:][counts[1:] > 0]


def equivalent_diameters(labels: np.ndarray) -> np.ndarray:
    sizes = label_sizes(labels).astype(float)
    if labels.ndim == 2:
        return 2.0 * np.sqrt(sizes / math.pi)
    return (6.0 * sizes / math.pi) ** (1.0 / 3.0)


def test_same_seed_gives_identical_frames() -> None:
    a = run(frames=3, seed=7, division_rate=0.3, **SMALL_2D)
    b = run(frames=3, seed=7, division_rate=0.3, **SMALL_2D)
    for (im_a, lab_a, div_a), (im_b, lab_b, div_b) in zip(a, b, strict=True):
        assert im_a.tobytes() == im_b.tobytes()
        assert lab_a.tobytes() == lab_b.tobytes()
        assert div_a == div_b


def test_different_seed_gives_different_frames() -> None:
    (im_a, lab_a, _), *_ = run(frames=1, seed=1, **SMALL_2D)
    (im_b, lab_b, _), *_ = run(frames=1, seed=2, **SMALL_2D)
    assert not np.array_equal(im_a, im_b)
    assert not np.array_equal(lab_a, lab_b)


def test_frames_do_not_depend_on_run_length() -> None:
    short = run(frames=2, seed=3, division_rate=0.3, **SMALL_2D)
    long = run(frames=4, seed=3, division_rate=0.3, **SMALL_2D)
    for (im_s, lab_s, div_s), (im_l, lab_l, div_l) in zip(short, long[:2], strict=True):
        assert np.array_equal(im_s, im_l)
        assert np.array_equal(lab_s, lab_l)
        assert div_s == div_l


@pytest.mark.parametrize("geometry", [SMALL_2D, SMALL_3D], ids=["2d", "3d"])
def test_dtypes_and_shapes(geometry: dict) -> None:
    frames = run(frames=2, **geometry)
    assert len(frames) == 2
    for image, labels, divisions in frames:
        assert image.shape == geometry["shape"]
        assert labels.shape == geometry["shape"]
        assert image.dtype == np.uint16
        assert labels.dtype == np.uint32
        assert isinstance(divisions, list)
        assert labels.max() > 0
    assert frames[0][2] == []


def test_camera_like_intensities() -> None:
    image, labels, _ = run(frames=1, granules=True)[0]
    background = np.median(image[labels == 0])
    nuclei = np.median(image[labels > 0])
    assert 100 <= background <= 300
    assert 200 <= nuclei - background <= 3000
    assert image.max() < 65535


@pytest.mark.parametrize("geometry", [SMALL_2D, SMALL_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("granules", [False, True])
def test_labelled_pixels_are_on_bright_nuclei(geometry: dict, granules: bool) -> None:
    for image, labels, _ in run(frames=2, granules=granules, division_rate=0.3, **geometry):
        image = image.astype(float)
        inside = labels > 0
        # background well away from any nucleus (blur and noise aside)
        far = ndimage.distance_transform_edt(~inside) > 3
        assert inside.any() and far.any()
        assert image[inside].mean() > image[far].mean() + 200
        # nearly every labelled pixel is brighter than nearly every background pixel
        assert np.percentile(image[inside], 1) > np.percentile(image[far], 99)
        # and every nucleus, on average, is clearly brighter than the background
        ids = np.unique(labels[inside])
        means = ndimage.mean(image, labels, ids)
        assert means.min() > np.percentile(image[far], 99.9)


def test_coverage_matches_density() -> None:
    for density in (0.2, 0.35):
        _, labels, _ = run(frames=1, shape=(256, 256), density=density)[0]
        assert abs((labels > 0).mean() - density) < 0.08


def test_ids_start_at_one_and_persist_without_divisions() -> None:
    frames = run(frames=4, division_rate=0.0, **SMALL_2D)
    first = set(np.unique(frames[0][1]).tolist()) - {0}
    assert first == set(range(1, len(first) + 1))
    for _, labels, divisions in frames[1:]:
        assert divisions == []
        assert set(np.unique(labels).tolist()) - {0} == first


def test_ids_persist_across_frames_except_at_divisions() -> None:
    frames = run(frames=6, division_rate=0.4, seed=5, **SMALL_2D)
    total = 0
    for (_, before, _), (_, after, divisions) in zip(frames, frames[1:], strict=False):
        ids_before = set(np.unique(before).tolist()) - {0}
        ids_after = set(np.unique(after).tolist()) - {0}
        mothers = {m for m, _ in divisions}
        daughters = [d for _, d in divisions]
        total += len(mothers)
        assert len(daughters) == 2 * len(mothers) == len(set(daughters))
        assert mothers <= ids_before
        assert not mothers & ids_after
        assert set(daughters) <= ids_after
        assert min(daughters, default=max(ids_before) + 1) > max(ids_before)
        assert ids_after == (ids_before - mothers) | set(daughters)
    assert total > 0


def test_daughters_are_smaller_and_side_by_side() -> None:
    frames = run(frames=5, division_rate=0.5, seed=2, shape=(160, 160), diameter=20.0)
    checked = 0
    for (_, before, _), (_, after, divisions) in zip(frames, frames[1:], strict=False):
        size_before = np.bincount(before.ravel())
        size_after = np.bincount(after.ravel())
        centres = ground_truth_centres(after)
        pairs: dict[int, list[int]] = {}
        for mother, daughter in divisions:
            pairs.setdefault(mother, []).append(daughter)
        for mother, (d1, d2) in pairs.items():
            assert size_after[d1] < size_before[mother]
            assert size_after[d2] < size_before[mother]
            assert np.linalg.norm(centres[d1] - centres[d2]) < 1.2 * 20.0
            checked += 1
    assert checked > 0


def test_population_is_capped() -> None:
    frames = run(frames=10, division_rate=1.0, **SMALL_2D)
    counts = [len(np.unique(labels)) - 1 for _, labels, _ in frames]
    assert counts[-1] > counts[0]
    assert max(counts) <= math.ceil(1.3 * counts[0]) + 2


def test_nuclei_are_single_connected_regions() -> None:
    for _, labels, _ in run(frames=4, division_rate=0.3, density=0.5, **SMALL_2D):
        for index, box in enumerate(ndimage.find_objects(labels)):
            if box is not None:
                assert ndimage.label(labels[box] == index + 1)[1] == 1


@pytest.mark.parametrize("geometry", [SMALL_2D, SMALL_3D], ids=["2d", "3d"])
def test_granules_change_image_not_labels(geometry: dict) -> None:
    plain = run(frames=3, seed=4, division_rate=0.3, granules=False, **geometry)
    grainy = run(frames=3, seed=4, division_rate=0.3, granules=True, **geometry)
    for (im_p, lab_p, div_p), (im_g, lab_g, div_g) in zip(plain, grainy, strict=True):
        assert np.array_equal(lab_p, lab_g)
        assert div_p == div_g
        assert not np.array_equal(im_p, im_g)
        inside = lab_p > 0
        # granules add bright spots inside nuclei
        assert np.percentile(im_g[inside], 99) > np.percentile(im_p[inside], 99) + 100


@pytest.mark.parametrize(
    ("geometry", "frames"),
    [({"shape": (256, 256), "diameter": 24.0}, 3), ({"shape": (40, 96, 96), "diameter": 16.0}, 2)],
    ids=["2d", "3d"],
)
def test_mean_equivalent_diameter_close_to_requested(geometry: dict, frames: int) -> None:
    for _, labels, _ in run(frames=frames, division_rate=0.1, **geometry):
        mean = equivalent_diameters(labels).mean()
        assert abs(mean - geometry["diameter"]) < 0.2 * geometry["diameter"]


@pytest.mark.parametrize(
    "changes",
    [
        {"frames": 0},
        {"frames": 2.5},
        {"shape": (0, 64)},
        {"shape": (64,)},
        {"shape": (4, 4, 4, 4)},
        {"shape": (64, -3)},
        {"diameter": 0.0},
        {"diameter": -5.0},
        {"diameter": float("nan")},
        {"diameter": 100.0, "shape": (64, 256)},
        {"diameter": 20.0, "shape": (8, 64, 64)},
        {"density": 0.0},
        {"density": 1.5},
        {"division_rate": -0.1},
        {"division_rate": 2.0},
        {"seed": -1},
        {"granules": "yes"},
        {"texture": -0.1},
        {"debris": float("inf")},
        {"dim_fraction": 1.5},
    ],
)
def test_bad_specs_raise_user_input_error(changes: dict) -> None:
    spec = SimulationSpec(**changes)
    with pytest.raises(UserInputError):
        spec.validate()
    with pytest.raises(UserInputError):
        simulate_frames(spec)  # validates before the first frame is asked for


def test_default_spec_is_valid() -> None:
    SimulationSpec().validate()
    SimulationSpec(shape=(16, 128, 128), diameter=12.0).validate()


def test_ground_truth_centres_of_known_labels() -> None:
    labels = np.zeros((10, 12), dtype=np.uint32)
    labels[1:4, 2:5] = 3
    labels[6, 7:10] = 8
    centres = ground_truth_centres(labels)
    assert set(centres) == {3, 8}
    np.testing.assert_allclose(centres[3], [2.0, 3.0])
    np.testing.assert_allclose(centres[8], [6.0, 8.0])
    assert ground_truth_centres(np.zeros((5, 5), dtype=np.uint32)) == {}


@pytest.mark.parametrize("geometry", [SMALL_2D, SMALL_3D], ids=["2d", "3d"])
def test_ground_truth_centres_of_simulated_frame(geometry: dict) -> None:
    _, labels, _ = run(frames=1, **geometry)[0]
    centres = ground_truth_centres(labels)
    assert set(centres) == set(np.unique(labels).tolist()) - {0}
    for label, centre in centres.items():
        assert centre.shape == (labels.ndim,)
        assert labels[tuple(np.rint(centre).astype(int))] == label


@pytest.mark.parametrize("geometry", [SMALL_2D, SMALL_3D], ids=["2d", "3d"])
def test_hard_cases_change_the_image_not_the_labels(geometry: dict) -> None:
    plain = run(frames=2, seed=5, division_rate=0.3, **geometry)
    hard = run(
        frames=2, seed=5, division_rate=0.3, texture=0.3, debris=1.0, dim_fraction=0.5, **geometry
    )
    for (im_p, lab_p, div_p), (im_h, lab_h, div_h) in zip(plain, hard, strict=True):
        assert np.array_equal(lab_p, lab_h)
        assert div_p == div_h
        background = lab_p == 0
        # texture and debris brighten the background in places
        assert np.percentile(im_h[background], 99.5) > np.percentile(im_p[background], 99.5) + 50


def test_texture_debris_and_dim_nuclei_each_do_what_they_say() -> None:
    geometry = {"shape": (192, 192), "diameter": 16.0, "seed": 2}
    ((plain, labels, _),) = run(frames=1, **geometry)
    ((textured, _, _),) = run(frames=1, texture=0.3, **geometry)
    ((with_debris, _, _),) = run(frames=1, debris=2.0, **geometry)
    ((dimmed, _, _),) = run(frames=1, dim_fraction=0.5, **geometry)
    background = ndimage.binary_dilation(labels > 0, iterations=3) == 0
    # texture: a smooth structure across the whole background, not a few spots
    lifted = (textured.astype(float) - plain)[background]
    assert 0.2 < np.mean(lifted > 20) < 0.8
    # debris: a few bright compact spots outside nuclei, as bright as nuclei or brighter
    extra = (with_debris.astype(float) - plain) > 200
    spots = ndimage.label(extra & background)[1]
    assert spots >= 5
    # dim nuclei: about half the nuclei at a quarter to a third of their brightness
    ids = np.unique(labels[labels > 0])
    ratio = np.array(
        [(dimmed[labels == i].mean() - 100) / (plain[labels == i].mean() - 100) for i in ids]
    )
    assert 0.25 < np.mean(ratio < 0.5) < 0.75
    assert np.all((ratio > 0.2) & (ratio < 0.55) | (ratio > 0.9))
