"""The mini U-Net's size arithmetic, the OCE loss and its pair sampling, and checkpoint files."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from cellulus_scale.config import ModelConfig, TrainConfig
from cellulus_scale.errors import UserInputError
from cellulus_scale.kernels.normalisation import Normalisation
from cellulus_scale.model import checkpoint as checkpoint_module
from cellulus_scale.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cellulus_scale.model.loss import damping, oce_loss, sample_pairs
from cellulus_scale.model.unet import (
    UNet,
    check_input_size,
    context,
    contexts,
    output_size,
    pooling_step,
    smallest_valid_size_at_least,
    valid_sizes_near,
)

TINY = ModelConfig(feature_maps=2, feature_factor=2)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared machine torch's default (one per core) stalls in
    OpenMP barriers whenever other processes hold a core, and runs 2-5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def forward_size(config: ModelConfig, size: int) -> tuple[int, ...]:
    model = UNet(config).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, config.in_channels, *(size,) * config.spatial_dims))
    return tuple(out.shape)


# --- architecture -------------------------------------------------------------------------


def test_depth_1_turns_252_into_236() -> None:
    assert output_size(252, 1) == 236
    assert forward_size(ModelConfig(feature_maps=4), 252) == (1, 2, 236, 236)


def test_paper_model_blocks_and_head() -> None:
    model = UNet(ModelConfig())
    for block in [*model.down, model.bottom, *model.up]:
        convs = [m for m in block if isinstance(m, nn.Conv2d)]
        assert [c.kernel_size[0] for c in convs] == [3, 1, 1, 3]
        assert all(c.padding == (0, 0) for c in convs)  # valid convolutions
        assert sum(isinstance(m, nn.ReLU) for m in block) == 4
    assert model.down[0][0].out_channels == 64
    assert model.bottom[0].out_channels == 192  # x3 per level
    head = [m for m in model.head if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size[0] for c in head] == [1, 1] and head[-1].out_channels == 2


def test_context_of_depth_1_is_8() -> None:
    assert context(1) == 8
    size = smallest_valid_size_at_least(100, 1)
    assert (size - forward_size(TINY, size)[-1]) // 2 == 8


def test_depth_3_context_follows_from_the_architecture() -> None:
    deep = replace(TINY, depth=3)
    assert context(3) == 44
    assert output_size(252, 3) == 252 - 2 * 44
    smallest = smallest_valid_size_at_least(1, 3)
    for size in (smallest, smallest_valid_size_at_least(smallest + 1, 3)):
        out = forward_size(deep, size)[-1]
        assert out == output_size(size, 3)
        assert size - out == 2 * context(3)
    assert context(3) > context(2) > context(1)


@pytest.mark.parametrize("depth", [1, 2])
def test_output_size_matches_a_real_forward_pass(depth: int) -> None:
    config = replace(TINY, depth=depth)
    sizes = [s for s in range(1, 110) if output_size(s, depth) is not None]
    assert sizes, "no valid sizes"
    for size in sizes[:6]:
        assert forward_size(config, size)[-1] == output_size(size, depth)
        assert size - output_size(size, depth) == 2 * context(depth)


@pytest.mark.parametrize(("size", "depth", "near"), [(251, 1, "250 or 252"), (250, 3, "244")])
def test_invalid_sizes_are_refused_naming_the_nearest_valid(
    size: int, depth: int, near: str
) -> None:
    assert output_size(size, depth) is None
    with pytest.raises(UserInputError) as error:
        check_input_size(size, depth)
    assert near in str(error.value)
    for valid in valid_sizes_near(size, depth):
        assert output_size(valid, depth) is not None
        check_input_size(valid, depth)


def test_too_small_sizes_are_refused() -> None:
    assert output_size(17, 1) is None
    with pytest.raises(UserInputError, match="18"):
        check_input_size(17, 1)


def test_3d_model_forward_shape() -> None:
    config = ModelConfig(spatial_dims=3, feature_maps=2)
    model = UNet(config).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 20, 36, 44))
    assert out.shape == (2, 3, 20 - 16, 36 - 16, 44 - 16)
    assert isinstance(model.down[0][0], nn.Conv3d)


@pytest.mark.parametrize(
    ("spacing", "depth", "flat"),
    [((2.18, 1.0, 1.0), 1, 1), ((5.0, 1.0, 1.0), 2, 2), ((3.0, 1.0, 1.0), 2, 1)],
)
def test_anisotropic_3d_model_pools_in_plane_first_and_its_context_follows(
    spacing: tuple[float, ...], depth: int, flat: int
) -> None:
    """A z step of at least twice the pixel: the first levels pool (1, 2, 2) with 1x3x3 kernels;
    the context per axis is what a real forward pass loses."""
    config = ModelConfig(
        spatial_dims=3, feature_maps=2, feature_factor=2, depth=depth, spacing=spacing
    )
    assert config.flat_levels == flat
    assert replace(config, spacing=(1.9, 1.0, 1.0)).flat_levels == 0
    assert replace(config, spacing=None).flat_levels == 0
    model = UNet(config).eval()
    assert model.down[0][0].kernel_size == (1, 3, 3)
    assert model.bottom[0].kernel_size == (3, 3, 3)
    halo_z, halo_y, halo_x = contexts(config)
    assert halo_y == halo_x == context(depth) and halo_z < halo_y
    for extra in (0, 2 ** (depth - flat)):
        z = smallest_valid_size_at_least(2 * halo_z + 1, depth, flat) + extra
        y = smallest_valid_size_at_least(2 * halo_y + 1, depth)
        with torch.no_grad():
            out = model(torch.zeros(1, 1, z, y, y + 2**depth))
        assert tuple(out.shape[2:]) == (z - 2 * halo_z, y - 2 * halo_y, y + 2**depth - 2 * halo_y)
        assert output_size(z, depth, flat) == z - 2 * halo_z


def test_widely_spaced_planes_make_every_level_flat_and_old_checkpoints_keep_their_bottom() -> None:
    """A z step of 5 px at depth 1: the bottom level too is flat (its pixel, 2 px, is still
    under half the z step), so the network never mixes planes: no z context, and a stack of 5
    planes passes whole. A checkpoint written before the bottom could be flat keeps its 3x3x3
    bottom."""
    config = ModelConfig(spatial_dims=3, feature_maps=2, depth=1, spacing=(5.0, 1.0, 1.0))
    assert config.flat_levels == 2
    assert replace(config, spacing=(3.0, 1.0, 1.0)).flat_levels == 1
    assert contexts(config) == (0, context(1), context(1))
    model = UNet(config).eval()
    assert model.bottom[0].kernel_size == model.up[0][0].kernel_size == (1, 3, 3)
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 5, 36, 36))
    assert tuple(out.shape[2:]) == (5, 36 - 2 * context(1), 36 - 2 * context(1))
    assert output_size(5, 1, 2) == 5 and pooling_step(1, 2) == 1
    assert ModelConfig.from_dict(config.to_dict()) == config
    written_before = {k: v for k, v in config.to_dict().items() if k != "flat_bottom"}
    old = ModelConfig.from_dict(written_before)
    assert old.flat_levels == 1 and UNet(old).bottom[0].kernel_size == (3, 3, 3)
    assert "flat_bottom" not in replace(config, spacing=None).to_dict()


def test_3d_rays_follow_the_voxel_size_and_old_checkpoints_keep_theirs() -> None:
    """A StarDist model's 3D rays are spread evenly in physical space: StarDist's anisotropy is
    the voxel size over its smallest side. 2D, isotropic voxels and checkpoints written before
    (voxel size but no ``physical_rays``) keep rays even in voxels."""
    config = ModelConfig(spatial_dims=3, out_channels=17, spacing=(2.18, 1.0, 1.0))
    assert config.ray_anisotropy == (2.18, 1.0, 1.0)
    assert replace(config, spacing=(1.0, 0.5, 0.5)).ray_anisotropy == (2.0, 1.0, 1.0)
    assert replace(config, spacing=(1.0, 1.0, 1.0)).ray_anisotropy is None
    assert replace(config, spacing=None).ray_anisotropy is None
    assert ModelConfig(out_channels=33).ray_anisotropy is None
    assert ModelConfig.from_dict(config.to_dict()) == config
    written_before = {k: v for k, v in config.to_dict().items() if k != "physical_rays"}
    assert ModelConfig.from_dict(written_before).ray_anisotropy is None
    assert "physical_rays" not in replace(config, spacing=None).to_dict()


def test_model_rejects_other_dimensions() -> None:
    with pytest.raises(ValueError):
        UNet(ModelConfig(spatial_dims=4))


# --- loss ---------------------------------------------------------------------------------


def test_damping_forms_at_known_inputs() -> None:
    x = torch.tensor([0.0, 10.0, 1e6])
    seed = damping(x, 10.0, "seed")
    reference = damping(x, 10.0, "reference")
    expected_seed = [0.5, 1.0 / (1.0 + math.exp(-1.0)), 1.0]
    expected_reference = [0.0, 1.0 - math.exp(-1.0), 1.0]
    assert seed.tolist() == pytest.approx(expected_seed, abs=1e-6)
    assert reference.tolist() == pytest.approx(expected_reference, abs=1e-6)
    with pytest.raises(ValueError):
        damping(x, 10.0, "other")  # type: ignore[arg-type]


def _two_pair_offsets() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offsets (1, 2, 3, 4): pair A is a perfect pair, pair B is 4 px apart along y."""
    offsets = torch.zeros(1, 2, 3, 4)
    offsets[0, :, 0, 0] = torch.tensor([1.0, 1.0])  # e(0,0) = (1,1) = e(1,1)
    offsets[0, :, 2, 3] = torch.tensor([3.0, -1.0])  # e(2,3) = (5,2); e(1,2) = (1,2)
    anchors = torch.tensor([[[0, 0], [1, 2]]])
    partners = torch.tensor([[[1, 1], [2, 3]]])
    return offsets, anchors, partners


@pytest.mark.parametrize("kind", ["seed", "reference"])
def test_oce_loss_on_two_known_pairs(kind: str) -> None:
    offsets, anchors, partners = _two_pair_offsets()
    lambda_reg = 0.1
    loss, parts = oce_loss(offsets, anchors, partners, tau=10.0, lambda_reg=lambda_reg, kind=kind)
    # pair A: squared distance 0; pair B: (1-5)^2 + (2-2)^2 = 16
    if kind == "seed":
        pair = (0.5 + 1.0 / (1.0 + math.exp(-1.6))) / 2
    else:
        pair = (0.0 + 1.0 - math.exp(-1.6)) / 2
    reg = (math.sqrt(2.0) + 0.0) / 2  # mean ||r|| over the anchors (0,0) and (1,2)
    assert parts["pair"] == pytest.approx(pair, rel=1e-6)
    assert parts["reg"] == pytest.approx(reg, rel=1e-6)
    assert float(loss) == pytest.approx(pair + lambda_reg * reg, rel=1e-6)


def test_oce_loss_pair_term_ignores_a_global_shift_and_has_gradients() -> None:
    offsets, anchors, partners = _two_pair_offsets()
    offsets.requires_grad_(True)
    loss, parts = oce_loss(offsets, anchors, partners, lambda_reg=0.0)
    _, shifted = oce_loss(offsets + 7.0, anchors, partners, lambda_reg=0.0)
    assert shifted["pair"] == pytest.approx(parts["pair"], rel=1e-6)
    loss.backward()
    assert offsets.grad is not None and offsets.grad.abs().sum() > 0


# --- pair sampling ------------------------------------------------------------------------


def test_pair_sampling_follows_the_appendix() -> None:
    shape, batch, kappa = (236, 236), 3, 10.0
    anchors, partners = sample_pairs(shape, batch, 0.2, kappa, torch.Generator().manual_seed(1))
    count = round(0.2 * 236 * 236)
    assert anchors.shape == partners.shape == (batch, count, 2)
    assert anchors.dtype == partners.dtype == torch.int64
    step = (partners - anchors).float()
    distance = step.norm(dim=-1)
    assert (distance > 0).all() and (distance <= kappa).all()
    for points in (anchors, partners):
        assert (points >= 0).all() and (points < 236).all()
    # anchors only where the whole radius stays inside the output
    assert (anchors >= 10).all() and (anchors < 236 - 10).all()
    # every integer offset of the disc is drawn (317 lattice points within radius 10, less 0)
    assert len(torch.unique((partners - anchors).reshape(-1, 2), dim=0)) == 316


def test_pair_sampling_is_deterministic_for_a_seeded_generator() -> None:
    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_pairs((44, 52), 2, 0.2, 10.0, torch.Generator().manual_seed(seed))

    first, again, other = draw(5), draw(5), draw(6)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_pair_sampling_in_3d_and_too_small_outputs() -> None:
    anchors, partners = sample_pairs((24, 30, 30), 1, 0.2, 10.0, torch.Generator().manual_seed(0))
    assert anchors.shape == (1, round(0.2 * 24 * 30 * 30), 3)
    distance = (partners - anchors).float().norm(dim=-1)
    assert (distance > 0).all() and (distance <= 10).all()
    assert (partners >= 0).all() and (partners < torch.tensor([24, 30, 30])).all()
    with pytest.raises(ValueError):
        sample_pairs((20, 40), 1, 0.2, 10.0)


def test_pair_sampling_and_loss_are_physical_with_a_voxel_size() -> None:
    """Partners lie within kappa in physical distance (z counts 2.5x), and the loss is zero
    for offsets that point every voxel at one physical place."""
    spacing = (2.5, 1.0, 1.0)
    shape = (12, 26, 26)
    anchors, partners = sample_pairs(
        shape, 2, 0.2, 10.0, torch.Generator().manual_seed(0), spacing=spacing
    )
    step = (partners - anchors).double() * torch.tensor(spacing, dtype=torch.float64)
    distance = step.norm(dim=-1)
    assert (distance > 0).all() and (distance <= 10.0).all()
    assert (partners - anchors)[..., 0].abs().max() == 4  # floor(10 / 2.5) planes
    assert (anchors[..., 0] >= 4).all() and (anchors[..., 0] < 12 - 4).all()
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    )
    to_centre = -(grid * torch.tensor(spacing).reshape(3, 1, 1, 1))[None].expand(2, -1, -1, -1, -1)
    loss, _ = oce_loss(
        to_centre, anchors, partners, kind="reference", lambda_reg=0, spacing=spacing
    )
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    unscaled, _ = oce_loss(to_centre, anchors, partners, kind="reference", lambda_reg=0)
    assert float(unscaled) > 0.1  # the same offsets are wrong in voxel units


# --- checkpoints --------------------------------------------------------------------------


def _checkpoint() -> Checkpoint:
    config = ModelConfig(feature_maps=4)
    torch.manual_seed(3)
    return Checkpoint(
        kind="oce",
        model_config=config,
        normalisation=Normalisation(12.5, 830.0),
        state_dict=UNet(config).state_dict(),
        data_axes="tyx",
        train_config=replace(TrainConfig(), crop_size=124).to_dict(),
        training_state={"step": 7, "steps_per_epoch": 3},
    )


def test_checkpoint_keeps_the_voxel_size(tmp_path: Path) -> None:
    config = ModelConfig(spatial_dims=3, feature_maps=2, spacing=(2.18, 1.0, 1.0))
    path = tmp_path / "aniso.pt"
    save_checkpoint(
        Checkpoint("oce", config, Normalisation(0.0, 1.0), UNet(config).state_dict(), "zyx"), path
    )
    loaded = load_checkpoint(path)
    assert loaded.model_config == config and loaded.model_config.flat_levels == 1
    assert "spacing" not in ModelConfig().to_dict()  # isotropic checkpoints keep their layout


def test_checkpoint_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = _checkpoint()
    path = tmp_path / "model.pt"
    save_checkpoint(original, path)
    assert not list(tmp_path.glob("*.partial"))
    calls: list[dict] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "load", spy)
    loaded = load_checkpoint(path, kind="oce")
    assert calls and all(call.get("weights_only") is True for call in calls)
    assert loaded.model_config == original.model_config
    assert loaded.normalisation == original.normalisation
    assert loaded.train_config == original.train_config
    assert loaded.training_state == original.training_state
    assert loaded.data_axes == "tyx"
    assert loaded.state_dict.keys() == original.state_dict.keys()
    for key, value in original.state_dict.items():
        assert torch.equal(loaded.state_dict[key], value)
    model = loaded.build_model()
    assert not model.training
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 36, 36)).shape == (1, 2, 20, 20)


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    noise = tmp_path / "noise.pt"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"weight": torch.zeros(3)}, "epoch": 4}, other)
    for path in (noise, other, tmp_path / "missing.pt"):
        with pytest.raises(UserInputError, match="checkpoint"):
            load_checkpoint(path)


def test_truncated_and_damaged_checkpoints_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "model.pt"
    save_checkpoint(_checkpoint(), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="truncated or damaged"):
        load_checkpoint(truncated)
    mismatched = _checkpoint()
    mismatched.model_config = ModelConfig(feature_maps=8)
    wrong_weights = tmp_path / "mismatched.pt"
    save_checkpoint(mismatched, wrong_weights)
    with pytest.raises(UserInputError, match="do not match"):
        load_checkpoint(wrong_weights)
    with pytest.raises(UserInputError, match="'stardist' model"):
        load_checkpoint(good, kind="stardist")
