"""The per-block clustering and post-processing kernels (cellulus_scale.kernels.clustering)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cellulus_scale.kernels.clustering import (
    keep_largest_components,
    object_contrast,
    postprocess,
)


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    y, x = np.indices(shape)
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2


def test_an_object_keeps_only_its_largest_connected_part() -> None:
    labels = np.zeros((40, 40), dtype=np.int64)
    labels[disc(labels.shape, (12, 12), 6)] = 1
    labels[30:32, 30:32] = 1  # stray pixels pointing at the same centre
    labels[disc(labels.shape, (28, 12), 5)] = 2
    kept = keep_largest_components(labels)
    assert kept[31, 31] == 0
    assert np.array_equal(kept == 1, disc(labels.shape, (12, 12), 6))
    assert np.array_equal(kept == 2, labels == 2)


def test_contrast_is_high_for_a_nucleus_and_low_for_a_patch_of_background() -> None:
    rng = np.random.default_rng(0)
    intensity = rng.normal(100.0, 10.0, (80, 80))
    nucleus = disc(intensity.shape, (20, 20), 8)
    intensity[nucleus] += 200.0
    labels = np.zeros(intensity.shape, dtype=np.int64)
    labels[nucleus] = 1
    patch = disc(intensity.shape, (60, 60), 8)
    labels[patch] = 2
    contrast = object_contrast(labels, intensity, ring=4)
    assert contrast[0] > 10
    assert abs(contrast[1]) < 1
    # surrounded by other objects: no ring, never dropped
    crowded = np.ones((20, 20), dtype=np.int64)
    crowded[5:15, 5:15] = 2
    assert np.isposinf(object_contrast(crowded, np.ones((20, 20)), ring=3)[1])


def test_postprocess_drops_speckles_and_stray_parts_and_keeps_nuclei() -> None:
    rng = np.random.default_rng(1)
    shape = (96, 96)
    intensity = ndimage.gaussian_filter(rng.normal(100.0, 20.0, shape), 1.0)
    truth = np.zeros(shape, dtype=np.int64)
    for index, centre in enumerate([(20, 20), (20, 60), (70, 30)], start=1):
        mask = disc(shape, centre, 9)
        truth[mask] = index
        intensity[mask] += 150.0
    # the clustering's territories: each nucleus with a margin and a stray fragment, plus a
    # speckle object in the background
    labels = np.zeros(shape, dtype=np.uint32)
    for index, centre in enumerate([(20, 20), (20, 60), (70, 30)], start=1):
        labels[disc(shape, centre, 12)] = 10 * index
    labels[50:53, 85:88] = 10
    labels[disc(shape, (75, 75), 10)] = 99
    out = postprocess(labels, intensity, "nucleus", 3, 6, min_size=30, ring=6, min_contrast=1.0)
    assert set(np.unique(out)) == {0, 10, 20, 30}
    assert out[51, 86] == 0  # the stray fragment of object 10
    for index in (1, 2, 3):
        inter = np.logical_and(out == 10 * index, truth == index).sum()
        union = np.logical_or(out == 10 * index, truth == index).sum()
        assert inter / union > 0.8
    # without the contrast rule the speckle stays
    kept = postprocess(labels, intensity, "nucleus", 3, 6, min_size=30, ring=6)
    assert 99 in np.unique(kept)


def test_compact_oces_keep_offsets_to_half_a_step_and_foreground_exactly() -> None:
    from cellulus_scale.kernels import compact
    from cellulus_scale.methods.centres import HIST_EDGES, snapped_edge

    rng = np.random.default_rng(0)
    offsets = rng.uniform(-40, 40, (2, 64, 64)).astype(np.float32)
    std = np.exp(rng.uniform(-3, 4, (64, 64))).astype(np.float32)
    step = 28 / 64
    values = compact.encode(offsets, std, step, HIST_EDGES, 16, None)
    assert values.dtype == np.uint8 and values.shape == (3, 64, 64)
    decoded, _ = compact.decode(values, step, 0)
    assert np.abs(decoded - offsets).max() <= step / 2 + 1e-6
    far = np.full((2, 1, 1), 100.0, dtype=np.float32)  # beyond +-127 steps: clipped
    clipped, _ = compact.decode(
        compact.encode(far, std[:1, :1], step, HIST_EDGES, 16, None), step, 0
    )
    assert np.allclose(clipped, 127 * step)
    for edge in (1, 700, 1234, 2900, 4096):
        snapped = snapped_edge(edge, 16)
        assert snapped % 16 == 0 and abs(snapped - edge) <= 16
        _, foreground = compact.decode(values, step, snapped // 16)
        assert np.array_equal(foreground, std < HIST_EDGES[snapped])
    _, foreground = compact.decode(compact.encode(offsets, std, step, HIST_EDGES, 16, 5.0), step, 1)
    assert np.array_equal(foreground, std < 5.0)


def test_std_threshold_of_the_logarithm_separates_a_small_foreground() -> None:
    """The foreground rule on a pooled std histogram where 3% of the pixels are foreground (std
    around 1) and the rest background (std around 8, spread like real background): Otsu of the
    std falls inside the background's bulk, Otsu of its logarithm between the two modes."""
    from types import SimpleNamespace

    from cellulus_scale.config import SegmentationConfig
    from cellulus_scale.methods.centres import HIST_EDGES, compute_statistics

    rng = np.random.default_rng(0)
    std = np.concatenate(
        [rng.lognormal(np.log(1.0), 0.6, 3_000), rng.lognormal(np.log(8.0), 0.3, 97_000)]
    )
    counts = np.bincount(np.searchsorted(HIST_EDGES, std) - 1, minlength=len(HIST_EDGES) - 1)

    def threshold(rule: str, dims: int) -> float:
        settings = SimpleNamespace(segmentation=SegmentationConfig(28.0, std_threshold=rule))
        plan = SimpleNamespace(method="oce", settings=settings, spatial_dims=dims, frames=1)
        totals = SimpleNamespace(
            counts=counts, sums=np.zeros((dims, len(counts))), signal=[True], bins_per_code=1
        )
        return compute_statistics(plan, totals).threshold

    assert threshold("otsu", 2) > 4.0  # in the background's bulk
    assert 2.0 < threshold("log-otsu", 2) < 4.0  # between the modes
    # the default, 'auto': Otsu in 2D, log-Otsu in 3D (volumes: a small foreground)
    assert threshold("auto", 2) == threshold("otsu", 2)
    assert threshold("auto", 3) == threshold("log-otsu", 3) < threshold("otsu", 3)
    assert SegmentationConfig(28.0).std_threshold == "auto"
    assert SegmentationConfig(28.0, std_threshold="otsu").std_threshold_for(3) == "otsu"
