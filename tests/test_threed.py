"""Anisotropic 3D volumes: the voxel size from the metadata (or --voxel-size), per-axis crops
for thin stacks, the simulator's z step, and the 3D path end to end through the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage

from cellulus_scale.config import PRESETS, ModelConfig, SegmentationConfig
from cellulus_scale.errors import UserInputError
from cellulus_scale.io.ome_zarr import open_image, voxel_spacing
from cellulus_scale.kernels.clustering import embeddings_of, postprocess
from cellulus_scale.kernels.normalisation import Normalisation
from cellulus_scale.kernels.star_convex import star_distances
from cellulus_scale.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cellulus_scale.model.unet import UNet, contexts, smallest_valid_size_at_least
from cellulus_scale.simulation.simulate import SimulationSpec, simulate_frames
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import check_crop_shape, check_trainable

BIN = Path(sys.executable).parent


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "cellulus-scale"), *map(str, args)], capture_output=True, text=True
    )


def scale_of(store: Path, label: str | None = None) -> list[float]:
    group = zarr.open_group(str(store), mode="r")
    if label is not None:
        group = group["labels"][label]
    multiscale = group.attrs["multiscales"][0]
    return multiscale["datasets"][0]["coordinateTransformations"][0]["scale"]


@pytest.fixture(scope="module")
def thin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A thin anisotropic stack: 14 planes 3 px apart (42 px deep), 2 frames."""
    spec = SimulationSpec(frames=2, shape=(14, 56, 56), diameter=12.0, seed=1, z_scale=3.0)
    return write_simulation(tmp_path_factory.mktemp("threed") / "thin.zarr", spec)


def test_simulated_planes_are_spaced_by_the_z_scale(thin: Path) -> None:
    image = open_image(thin)
    assert image.scale == (1.0, 3.0, 1.0, 1.0)
    assert voxel_spacing(image) == (3.0, 1.0, 1.0)
    truth = zarr.open_group(str(thin), mode="r")["labels"]["ground_truth"]["0"][0]
    extents = np.array(
        [[s.stop - s.start for s in box] for box in ndimage.find_objects(truth) if box]
    )
    # nuclei of 12 px span about 12 / 3 planes but 12 px in-plane
    assert 2.5 <= np.median(extents[:, 0]) <= 6
    assert 9 <= np.median(extents[:, 1]) <= 16
    with pytest.raises(UserInputError, match="--depth"):
        list(simulate_frames(SimulationSpec(shape=(64, 64), z_scale=2.0)))


def test_voxel_size_override_and_its_refusals(thin: Path) -> None:
    image = open_image(thin)
    assert voxel_spacing(image, (2.0, 0.5, 0.5)) == (4.0, 1.0, 1.0)
    assert voxel_spacing(image, (1.0, 1.0, 1.0)) is None  # isotropic
    with pytest.raises(UserInputError, match="three positive"):
        voxel_spacing(image, (0.0, 1.0, 1.0))
    result = cli("train", thin, thin.parent / "x.pt", "--voxel-size", "2,1")
    assert result.returncode == 2 and "Z,Y,X" in result.stderr
    assert not (thin.parent / "x.pt").exists()


def test_a_thin_stack_trains_whole_in_z() -> None:
    """The default crop covers the whole z extent of a thin stack, with pairs within kappa in
    physical distance; a stack thinner than the network needs is refused in one line."""
    preset = PRESETS["cpu"]
    model = ModelConfig(spatial_dims=3, feature_maps=4, spacing=(3.0, 1.0, 1.0))
    assert model.flat_levels == 1
    shape = check_crop_shape(model, preset.train, (14, 200, 200))
    assert shape == (14, 124, 124)  # all 14 planes (the side's extent would be 42)
    deep = check_crop_shape(model, preset.train, (120, 200, 200))
    assert deep is not None and deep[0] == 42  # 124 px / 3 px per plane
    with pytest.raises(UserInputError, match="planes"):
        check_crop_shape(model, preset.train, (8, 200, 200))
    isotropic = ModelConfig(spatial_dims=3, feature_maps=4)
    with pytest.raises(UserInputError, match="planes"):
        check_crop_shape(isotropic, preset.train, (14, 200, 200))


def test_physical_embeddings_and_sizes() -> None:
    offsets = np.zeros((3, 2, 2, 2))
    embeddings = embeddings_of(offsets, (1, 0, 4), np.zeros(3), (2.5, 1.0, 1.0))
    assert embeddings[:, 1, 1, 1].tolist() == [5.0, 1.0, 5.0]
    # a 3 x 6 x 6 box of 2.5 px planes: 270 px^3, kept above 250 voxels' worth of physical size
    labels = np.zeros((9, 12, 12), np.uint32)
    labels[3:6, 3:9, 3:9] = 7
    kept = postprocess(labels, None, "none", 0, 0, 250 / 2.5, sampling=(2.5, 1.0, 1.0))
    assert (kept == 7).sum() == 108
    assert not postprocess(labels, None, "none", 0, 0, 300 / 2.5, sampling=(2.5, 1.0, 1.0)).any()
    # 'cell' erosion by 2 px: one 2.5 px plane is deeper than that, a 1 px one is not
    physical = postprocess(labels, None, "cell", 0.5, 2.0, 0, sampling=(2.5, 1.0, 1.0))
    voxels = postprocess(labels, None, "cell", 0.5, 2.0, 0)
    assert (physical > 0).sum() == 3 * (voxels > 0).sum() > 0


def test_log_otsu_and_li_keep_the_dim_rim_of_a_bright_textured_nucleus() -> None:
    """A nucleus with a bright core, a dim rim and background around it: Otsu of the
    intensities splits core from rim, Otsu of their logarithm and Li's threshold keep the rim;
    'auto' is Otsu in 2D and Li in 3D."""
    grid = np.indices((24, 24)) - 11.5
    radius = np.hypot(*grid)
    intensity = np.where(radius < 5, 2000.0, np.where(radius < 9, 400.0, 100.0))
    labels = (radius < 11).astype(np.uint32)
    plain = postprocess(labels, intensity, "nucleus", 0, 0, 0)
    logged = postprocess(labels, intensity, "nucleus", 0, 0, 0, nucleus_threshold="log-otsu")
    assert (plain > 0).sum() == (radius < 5).sum()
    assert (logged > 0).sum() == (radius < 9).sum()
    # a loose object (nucleus and background, as on anisotropic stacks) around a blurred nucleus
    # with two bright chromocentres: Otsu keeps a chromocentre, Li the nucleus
    grid = np.indices((32, 32)) - 15.5
    radius = np.hypot(*grid)
    spots = (np.hypot(grid[0] - 3, grid[1] + 2) < 2.5) | (np.hypot(grid[0] + 3, grid[1] - 3) < 2.5)
    for blur in (0, 1, 2):
        bright = np.where(spots, 2000.0, np.where(radius < 9, 400.0, 0.0))
        intensity = 100.0 + ndimage.gaussian_filter(bright, blur)
        labels = (radius < 14).astype(np.uint32)
        plain = postprocess(labels, intensity, "nucleus", 0, 0, 0)
        li = postprocess(labels, intensity, "nucleus", 0, 0, 0, nucleus_threshold="li")
        assert (plain > 0).sum() <= 150
        assert abs(int((li > 0).sum()) - int((radius < 9).sum())) <= 3
    settings = SegmentationConfig(diameter=10.0)
    assert (settings.nucleus_threshold_for(2), settings.nucleus_threshold_for(3)) == ("otsu", "li")
    chosen = SegmentationConfig(diameter=10.0, nucleus_threshold="log-otsu")
    assert chosen.nucleus_threshold_for(3) == "log-otsu"


def test_a_nucleolus_open_through_the_stacks_first_plane_is_filled() -> None:
    """A nucleus that the stack's first plane cuts, with a dark nucleolus reaching that plane:
    in 3D the hole is open through the stack's end, so each plane's holes are filled too."""
    z, y, x = np.indices((4, 32, 32))
    nucleus = np.hypot(y - 15.5, x - 15.5) < 11
    nucleolus = (np.hypot(y - 14, x - 17) < 3) & (z < 3)
    intensity = np.where(nucleus & ~nucleolus, 400.0, 100.0)
    labels = (np.hypot(y - 15.5, x - 15.5) < 14).astype(np.uint32)
    for threshold in ("otsu", "li"):
        kept = postprocess(labels, intensity, "nucleus", 0, 0, 0, nucleus_threshold=threshold)
        assert np.array_equal(kept > 0, nucleus)


def test_anisotropic_video_end_to_end_through_the_cli(thin: Path, tmp_path: Path) -> None:
    """simulate --z-scale, train, predict and evaluate on the command line: the model keeps
    the voxel size and pools in-plane first, the output keeps the input's scale."""
    video = tmp_path / "video.zarr"
    made = cli(
        "simulate", video, "--frames", 2, "--shape", "48,48", "--depth", 12, "--z-scale", 3,
        "--diameter", 12, "--seed", 2,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert scale_of(video) == [1.0, 3.0, 1.0, 1.0]
    model = tmp_path / "model.pt"
    trained = cli(
        "train", video, model, "--preset", "cpu", "--feature-maps", 4, "--batch-size", 2,
        "--epochs", 1, "--max-minutes", 0.05, "--num-workers", 0,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    config = load_checkpoint(model).model_config
    assert config.spacing == (3.0, 1.0, 1.0) and config.flat_levels == 1
    out = tmp_path / "out.zarr"
    predicted = cli(
        "predict", video, out, "--model", model, "--diameter", 12, "--workers", 1,
        "--tta", 2, "--block-size", 32, "--save-embeddings",
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    assert scale_of(out) == scale_of(video) == scale_of(out, "cellulus")
    # blocks per axis: 4 planes (3 blocks in z) by 16 x 16 px; the same embeddings
    thin_blocks = tmp_path / "thin_blocks.zarr"
    predicted = cli(
        "predict", video, thin_blocks, "--model", model, "--diameter", 12, "--workers", 1,
        "--tta", 2, "--block-size", "4,16,16", "--save-embeddings",
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    labels = zarr.open_array(str(thin_blocks / "labels" / "cellulus" / "0"), mode="r")
    assert labels.chunks == (1, 4, 16, 16)
    embeddings = [
        zarr.open_array(str(o / "embeddings" / "0"), mode="r")[:] for o in (out, thin_blocks)
    ]
    assert np.abs(embeddings[0] - embeddings[1]).max() < 1e-4
    for sides, named in (("2,16,16", "along z"), ("16,16", "3 spatial axes")):
        refused = cli(
            "predict", video, tmp_path / "refused.zarr", "--model", model, "--diameter", 12,
            "--block-size", sides,
        )  # fmt: skip
        assert refused.returncode == 2 and named in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "refused.zarr").exists()
    report = tmp_path / "scores.json"
    scored = cli("evaluate", out, "--truth", video, "--json", report)
    assert scored.returncode == 0, scored.stderr
    overall = json.loads(report.read_text())["overall"]
    assert overall["n_true"] > 0 and 0.0 <= overall["f1"] <= 1.0
    # a model trained for a z step of 3 px is refused on isotropic voxels, naming the fix
    refused = cli(
        "predict", video, tmp_path / "iso.zarr", "--model", model, "--diameter", 12,
        "--voxel-size", "1,1,1",
    )  # fmt: skip
    assert refused.returncode == 2 and "--voxel-size" in refused.stderr
    assert not (tmp_path / "iso.zarr").exists()


def test_a_stack_too_thin_for_the_network_is_refused_before_training(tmp_path: Path) -> None:
    spec = SimulationSpec(frames=1, shape=(6, 48, 48), diameter=12.0, z_scale=3.0)
    stack = write_simulation(tmp_path / "flat.zarr", spec)
    with pytest.raises(UserInputError, match="planes"):
        check_trainable(open_image(stack), PRESETS["cpu"])
    result = cli("predict", stack, tmp_path / "out.zarr")
    assert result.returncode == 2 and "planes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_few_widely_spaced_planes_train_and_predict_through_the_cli(tmp_path: Path) -> None:
    """A stack of 5 planes 5 px apart (a thin confocal stack of adherent cells): every level of
    the network is flat, so it trains on the 5 planes whole and predicts the same embeddings
    with blocks of 3 planes (no z context) as with the whole stack."""
    stack = tmp_path / "five.zarr"
    made = cli(
        "simulate", stack, "--frames", 1, "--shape", "48,48", "--depth", 5, "--z-scale", 5,
        "--diameter", 12, "--seed", 3,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    model = tmp_path / "model.pt"
    trained = cli(
        "train", stack, model, "--preset", "cpu", "--feature-maps", 4, "--batch-size", 2,
        "--epochs", 1, "--max-minutes", 0.05, "--num-workers", 0,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    config = load_checkpoint(model).model_config
    assert config.spacing == (5.0, 1.0, 1.0) and config.flat_levels == config.depth + 1
    embeddings = []
    for sides in ("5,48,48", "3,16,16"):
        out = tmp_path / f"out_{sides.replace(',', '_')}.zarr"
        predicted = cli(
            "predict", stack, out, "--model", model, "--diameter", 12, "--workers", 1,
            "--tta", 2, "--block-size", sides, "--save-embeddings",
        )  # fmt: skip
        assert predicted.returncode == 0, predicted.stderr
        assert scale_of(out, "cellulus") == scale_of(stack)
        embeddings.append(zarr.open_array(str(out / "embeddings" / "0"), mode="r")[:])
    assert embeddings[0].shape[-3:] == (5, 48, 48)
    assert np.abs(embeddings[0] - embeddings[1]).max() < 1e-4
    # the diameter is in-plane: nuclei wider (30 px) than the stack is deep (25 px) are allowed
    wide = cli(
        "predict", stack, tmp_path / "wide.zarr", "--model", model, "--diameter", 30,
        "--workers", 1, "--tta", 2,
    )  # fmt: skip
    assert wide.returncode == 0, wide.stderr


def test_a_stardist_model_trains_on_a_thin_anisotropic_stack(thin: Path, tmp_path: Path) -> None:
    """train-supervised in 3D (what refine trains): the model takes the stack's voxel size (its
    first level flat) and no grid; crops are the in-plane side by the planes of its physical
    extent, here more than the stack's 14: the network's z context past it is reflected."""
    model = tmp_path / "sd.pt"
    trained = cli(
        "train-supervised", thin, model, "--labels", "ground_truth", "--preset", "cpu",
        "--feature-maps", 2, "--batch-size", 1, "--epochs", 1, "--max-minutes", 0.05,
        "--num-workers", 0, "--n-rays", 16,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    checkpoint = load_checkpoint(model, kind="stardist")
    config = checkpoint.model_config
    assert config.spacing == (3.0, 1.0, 1.0) and config.grid == 1
    assert (config.depth, config.flat_levels, contexts(config)) == (2, 1, (8, 20, 20))
    assert checkpoint.train_config["crop_size"] == 56  # the planes (56 px): a depth-2 size
    assert config.ray_anisotropy == (3.0, 1.0, 1.0)  # rays spread evenly in space, not voxels
    predicted = cli(
        "predict", thin, tmp_path / "sd.zarr", "--model", model, "--diameter", 12,
        "--workers", 1,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr


def random_anisotropic_stardist(
    stack: Path, path: Path, ray_lengths: np.ndarray | None = None
) -> np.ndarray:
    """An untrained 3D StarDist model for planes 3 px apart whose probability varies over the
    stack and exceeds 0.5 on about 1% of it, with rays of about 4 voxels (or of ``ray_lengths``
    everywhere); returns its logit over the stack, from one forward pass of the whole stack
    reflected by the contexts."""
    torch.manual_seed(2)
    config = ModelConfig(
        spatial_dims=3, depth=2, feature_maps=4, out_channels=1 + 16, spacing=(3.0, 1.0, 1.0)
    )
    net = UNet(config)
    normalisation = Normalisation(136, 1136)
    raw = open_image(stack).canonical()[0].compute()
    pads = [
        (c, smallest_valid_size_at_least(s + 2 * c, 2, flat) - s - c)
        for s, c, flat in zip(raw.shape[1:], contexts(config), (1, 0, 0), strict=True)
    ]
    window = np.pad(normalisation.apply(raw), [(0, 0), *pads], mode="reflect")
    with torch.no_grad():
        net.head[-1].weight[0] *= 100
        net.head[-1].weight[1:] *= 0.01
        net.head[-1].bias[1:] = 4.0
        if ray_lengths is not None:
            net.head[-1].weight[1:] = 0.0
            net.head[-1].bias[1:] = torch.from_numpy(ray_lengths)
        logit = net(torch.from_numpy(np.ascontiguousarray(window[None])))[0, 0].numpy()
        net.head[-1].bias[0] = -float(np.percentile(logit, 99))
    save_checkpoint(Checkpoint("stardist", config, normalisation, net.state_dict(), "tzyx"), path)
    inside = tuple(slice(0, s) for s in raw.shape[1:])
    return logit[inside] + float(net.head[-1].bias[0])


def test_an_anisotropic_stardist_model_segments_the_same_with_blocks_that_split_z(
    tmp_path: Path,
) -> None:
    """The network reads each axis with its own context (8 planes in z, 20 px in-plane) on its
    own pooling grid: blocks of 16 planes by 40 x 40 px give the labels of the whole stack, and
    the objects lie where one forward pass of the whole stack puts its candidates."""
    spec = SimulationSpec(frames=1, shape=(40, 64, 64), diameter=12.0, seed=4, z_scale=3.0)
    stack = write_simulation(tmp_path / "stack.zarr", spec)
    model = tmp_path / "sd.pt"
    logit = random_anisotropic_stardist(stack, model)
    labels = {}
    for sides in ("16,40,40", "40,64,64"):
        out = tmp_path / f"out_{sides.replace(',', '_')}.zarr"
        predicted = cli(
            "predict", stack, out, "--model", model, "--diameter", 12, "--workers", 1,
            "--block-size", sides, "--mode", "none",
        )  # fmt: skip
        assert predicted.returncode == 0, predicted.stderr
        labels[sides] = zarr.open_array(str(out / "labels" / "cellulus" / "0"), mode="r")[:]
    split, whole = labels["16,40,40"], labels["40,64,64"]
    assert len(np.unique(whole)) > 20
    assert (split == whole).mean() > 0.999
    # each object sits on a candidate of the whole stack's forward pass: the outputs are placed
    # by the per-axis contexts (a probability above 0.5 next to most objects' centres; 18% when
    # z was read with the in-plane context)
    near = ndimage.maximum_filter(logit, size=3)
    centres = ndimage.center_of_mass(whole[0] > 0, whole[0], np.unique(whole[0])[1:])
    on_candidates = [near[tuple(int(round(c)) for c in centre)] > 0 for centre in centres]
    assert np.mean(on_candidates) > 0.8


def test_a_stardist_model_draws_its_objects_with_its_rays_spread_evenly_in_space(
    tmp_path: Path,
) -> None:
    """Prediction draws each polyhedron on the model's rays. A model for planes 3 px apart whose
    rays everywhere have the lengths of a ball 6 px in radius (on its rays: spread evenly in
    space) draws balls: 5 planes by 11 px at most. The same lengths drawn on rays spread evenly
    in voxels, as before, give objects 7 planes tall."""
    spec = SimulationSpec(frames=1, shape=(30, 48, 48), diameter=12.0, seed=4, z_scale=3.0)
    stack = write_simulation(tmp_path / "stack.zarr", spec)
    rays = ModelConfig(spatial_dims=3, out_channels=17, spacing=(3.0, 1.0, 1.0)).ray_anisotropy
    zz, yy, xx = np.indices((10, 20, 20))
    ball = (zz * 3 - 15) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 <= 36
    lengths = star_distances(ball.astype(np.uint16), 16, anisotropy=rays)[:, 5, 10, 10]
    model = tmp_path / "sd.pt"
    random_anisotropic_stardist(stack, model, lengths)
    out = tmp_path / "out.zarr"
    predicted = cli(
        "predict", stack, out, "--model", model, "--diameter", 12, "--workers", 1,
        "--mode", "none",
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    labels = zarr.open_array(str(out / "labels" / "cellulus" / "0"), mode="r")[0]
    boxes = ndimage.find_objects(labels)
    sides = np.array([[s.stop - s.start for s in box] for box in boxes if box is not None])
    assert len(sides) > 10
    assert sides[:, 0].max() == 5 and sides[:, 1:].max() == 11
