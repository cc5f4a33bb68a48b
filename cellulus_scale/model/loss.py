"""The self-supervised OCE loss and its pair sampling (seed, Appendix A)."""

from __future__ import annotations

import math

import torch

from cellulus_scale.config import Damping


def damping(squared_distance: torch.Tensor, tau: float, kind: Damping = "seed") -> torch.Tensor:
    """Saturating damper of a squared embedding distance.

    ``seed``: 1 / (1 + exp(-x / tau)) (the paper's appendix); ``reference``: 1 - exp(-x / tau)
    (the authors' code).
    """
    if kind == "seed":
        return torch.sigmoid(squared_distance / tau)
    if kind == "reference":
        return 1.0 - torch.exp(-squared_distance / tau)
    raise ValueError(f"unknown damping {kind!r}")


def _reach(kappa: float, spacing: tuple[float, ...] | None, dims: int) -> list[int]:
    """Per axis, the most voxels a partner within physical radius ``kappa`` can lie away."""
    if spacing is None:
        return [int(math.floor(kappa))] * dims
    return [int(math.floor(kappa / float(s))) for s in spacing]


def _disc_offsets(
    kappa: float, dims: int, spacing: tuple[float, ...] | None = None
) -> torch.Tensor:
    """All non-zero integer offsets (voxels) within physical radius ``kappa`` (an (n, dims)
    tensor); ``spacing``: the voxel size per axis (None: 1)."""
    axes = [torch.arange(-r, r + 1) for r in _reach(kappa, spacing, dims)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dims)
    physical = grid.float() if spacing is None else grid.double() * torch.tensor(spacing).double()
    norm2 = (physical**2).sum(dim=1)
    keep = (norm2 <= kappa**2) & (norm2 > 0)
    return grid[keep]


def sample_pairs(
    spatial_shape: tuple[int, ...],
    batch: int,
    fraction: float,
    kappa: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    spacing: tuple[float, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample anchor pixels P1 and one partner P2 within radius ``kappa`` for each.

    P1 holds ``fraction`` of all output pixels per batch item; anchors are drawn only where the
    whole radius stays inside the output, so every partner is in bounds. With ``spacing`` (the
    voxel size per axis, in in-plane pixels) the radius is physical: fewer planes in z. Returns
    two integer tensors of shape (batch, n, dims): anchor and partner coordinates.
    """
    dims = len(spatial_shape)
    reach = _reach(kappa, spacing, dims)
    inner = [size - 2 * r for size, r in zip(spatial_shape, reach, strict=True)]
    if min(inner) < 1:
        raise ValueError(f"output {spatial_shape} is too small for pairs within radius {kappa}")
    total = math.prod(spatial_shape)
    count = max(1, int(round(fraction * total)))
    inner_total = math.prod(inner)
    flat = torch.randint(0, inner_total, (batch, count), generator=generator)
    anchors = torch.stack(torch.unravel_index(flat, tuple(inner)), dim=-1) + torch.tensor(reach)
    offsets = _disc_offsets(kappa, dims, spacing)
    choice = torch.randint(0, len(offsets), (batch, count), generator=generator)
    partners = anchors + offsets[choice]
    return anchors.to(device), partners.to(device)


def coordinate_grid(
    spatial_shape: tuple[int, ...],
    device: torch.device | str,
    spacing: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Pixel coordinates as a (dims, *spatial_shape) float tensor; with ``spacing``, physical
    coordinates (index x voxel size, in in-plane pixels)."""
    axes = [torch.arange(size, device=device, dtype=torch.float32) for size in spatial_shape]
    if spacing is not None:
        axes = [a * float(s) for a, s in zip(axes, spacing, strict=True)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _gather(values: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """values (B, C, *S), coords (B, n, dims) -> (B, n, C)."""
    batch, channels = values.shape[:2]
    spatial = values.shape[2:]
    flat_index = torch.zeros(coords.shape[:2], dtype=torch.long, device=values.device)
    for axis, size in enumerate(spatial):
        flat_index = flat_index * size + coords[..., axis]
    flat = values.reshape(batch, channels, -1)
    index = flat_index.unsqueeze(1).expand(batch, channels, flat_index.shape[1])
    return torch.gather(flat, 2, index).transpose(1, 2)


def oce_loss(
    offsets: torch.Tensor,
    anchors: torch.Tensor,
    partners: torch.Tensor,
    tau: float = 10.0,
    lambda_reg: float = 1e-5,
    kind: Damping = "seed",
    spacing: tuple[float, ...] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pairwise OCE loss on predicted offsets r (B, dims, *S).

    The embedding is e(i) = r(i) + i (i in physical units where ``spacing`` is given); the loss
    is the mean over pairs of sigma(||e(i) - e(j)||^2) plus ``lambda_reg`` times the mean
    ||r(i)|| over anchors.
    """
    grid = coordinate_grid(tuple(offsets.shape[2:]), offsets.device, spacing)
    embeddings = offsets + grid
    e_anchor = _gather(embeddings, anchors)
    e_partner = _gather(embeddings, partners)
    squared = ((e_anchor - e_partner) ** 2).sum(dim=-1)
    pair_term = damping(squared, tau, kind).mean()
    reg_term = _gather(offsets, anchors).norm(dim=-1).mean()
    loss = pair_term + lambda_reg * reg_term
    return loss, {"pair": float(pair_term.detach()), "reg": float(reg_term.detach())}


def stardist_loss(
    output: torch.Tensor,
    probability: torch.Tensor,
    distances: torch.Tensor,
    weight: torch.Tensor,
    dist_weight: float = 0.2,
    reg_weight: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The StarDist objective (seed, Appendix B) on a batch.

    ``output`` (B, 1 + n_rays, *out): the probability logit, then the ray lengths. Targets:
    ``probability`` (B, *out) (normalised distance to the object border), ``distances``
    (B, n_rays, *out), ``weight`` (B, *out) (0 for pixels left out of the loss).
    Loss = weighted binary cross-entropy of the probability + ``dist_weight`` x (mean absolute
    error of the distances weighted by the true probability, normalised by its mean, +
    ``reg_weight`` x mean squared predicted distance on background), as StarDist does.
    """
    logit, predicted = output[:, 0], output[:, 1:]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, probability, reduction="none")
    total_weight = weight.sum().clamp_min(1.0)
    prob_loss = (bce * weight).sum() / total_weight
    mask = probability * weight
    error = (predicted - distances).abs().mean(dim=1)
    dist_loss = (mask * error).sum() / mask.sum().clamp_min(1e-6)
    background = (1.0 - probability.clamp(0, 1)) * weight
    reg = (background * (predicted**2).mean(dim=1)).sum() / total_weight
    loss = prob_loss + dist_weight * (dist_loss + reg_weight * reg)
    return loss, {
        "prob": float(prob_loss.detach()),
        "dist": float(dist_loss.detach()),
        "reg": float(reg.detach()),
    }
