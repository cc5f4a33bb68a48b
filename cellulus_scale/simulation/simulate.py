"""Simulated fluorescence time-lapse microscopy of nuclei, with ground truth.

The simulator imitates the Cell Tracking Challenge's Fluo-N2DH-SIM+ data: elliptical
(or, in 3D, ellipsoidal) nuclei with textured interiors and varied brightness drift a little
from frame to frame and sometimes divide; the frame is blurred by a Gaussian point-spread
function, sits on an uneven background and carries Poisson shot noise and Gaussian read noise.
With ``granules=True`` every nucleus also holds a few small bright spots, which makes
classical methods over-segment. Three options imitate what real fluorescence fields add and
the plain simulator lacks: ``texture`` (structured background, such as out-of-focus light and
autofluorescence, at a share of the nucleus brightness), ``debris`` (small bright particles
that are not nuclei and are not labelled) and ``dim_fraction`` (a share of nuclei at a quarter
to a third of the usual brightness).

This module is a pure NumPy/SciPy kernel: it does no I/O. :func:`simulate_frames` yields one
frame at a time; the state carried from frame to frame is a few numbers per nucleus, so a
frame costs only its own arrays (each nucleus is drawn inside its bounding box).

Random streams: every quantity comes from :func:`numpy.random.default_rng` seeded with
``(seed, stream, index)``, where ``stream`` separates the nuclei dynamics (per frame), the
camera noise (per frame), the background (once) and the granules (per nucleus ID). Hence the
same spec gives byte-identical frames, the first frames of a longer run equal a shorter run,
and switching granules on or off changes the image but never the labels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from cellulus_scale.errors import UserInputError

__all__ = ["SimulationSpec", "ground_truth_centres", "simulate_frames"]

# Random stream identifiers (second entry of the seed sequence).
_STREAM_DYNAMICS = 1
_STREAM_NOISE = 2
_STREAM_BACKGROUND = 3
_STREAM_GRANULES = 4
_STREAM_TEXTURE = 5
_STREAM_DEBRIS = 6
_STREAM_DIM = 7

_MIN_DIAMETER = 4.0  # pixels; smaller nuclei would not be drawn reliably
_SIZE_SPREAD = 0.15  # equivalent diameters are uniform in D * (1 +- spread)
_MAX_AXIS_RATIO = 1.5  # long / short axis
_START_SPACING = 0.8  # at t=0, centre distance >= this * mean diameter of the pair
_MOTION_SPACING = 0.7  # while moving, neighbours are pushed apart below this
_POPULATION_CAP = 1.3  # divisions stop above this multiple of the initial nucleus count
_PLACEMENT_TRIES = 30  # placement attempts per wanted nucleus at t=0
_DRIFT = 0.05  # std of the per-frame velocity innovation, as a fraction of D
_PERSISTENCE = 0.6  # velocity kept from one frame to the next
_GROWTH = 0.25  # fraction of the gap to the target size closed per frame
_BRIGHTNESS = (400.0, 800.0)  # photo-electrons per pixel at the nucleus (factor 2 spread)
_TEXTURE_BLOBS = 8
_TEXTURE_STRENGTH = 0.35
_TEXTURE_RANGE = (0.6, 1.6)
_GRANULE_COUNT = (3, 8)  # integers in [low, high)
_GRANULE_FWHM = (2.0, 4.0)  # pixels
_GRANULE_GAIN = (1.0, 2.0)  # peak, relative to the nucleus brightness
_CAMERA_OFFSET = 100.0  # counts
_READ_NOISE = 3.0  # counts (std)
_PSF_SIGMA = 1.0  # pixels, in Y and X
_PSF_SIGMA_Z = 1.5  # pixels, along Z for 3D frames
_MAX_COUNT = 65535
_TEXTURE_SCALE = 0.3  # background texture correlation length, as a fraction of D
_DEBRIS_SIZE = (0.15, 0.5)  # debris diameter, as a fraction of D
_DEBRIS_GAIN = (1.0, 3.0)  # debris peak, relative to the mean nucleus brightness
_DIM_GAIN = (0.25, 0.35)  # brightness of a dim nucleus, relative to its drawn brightness


@dataclass(frozen=True)
class SimulationSpec:
    """What to simulate: frame count, frame shape, nucleus size and dynamics, and seed.

    ``shape`` is ``(Y, X)`` for 2D frames or ``(Z, Y, X)`` for 3D frames (ellipsoidal
    nuclei, isotropic voxels). ``density`` is the wanted fraction of the frame covered by
    nuclei at t=0 (the non-overlap rule caps what is reached at about 0.65).
    ``division_rate`` is the chance per nucleus per frame that it divides. ``texture`` is the
    peak of the background texture as a share of the mean nucleus brightness (0 for none),
    ``debris`` the number of debris particles per nucleus at t=0 and ``dim_fraction`` the share
    of dim nuclei. With all three at 0 the frames are those of earlier versions, byte for byte.
    """

    frames: int = 5
    shape: tuple[int, ...] = (256, 256)
    diameter: float = 24.0
    granules: bool = False
    seed: int = 0
    density: float = 0.35
    division_rate: float = 0.03
    texture: float = 0.0
    debris: float = 0.0
    dim_fraction: float = 0.0
    # 3D: planes spaced this many pixels apart (anisotropic voxels); nuclei, motion and density
    # live in physical space (in-plane pixels) and the blur spans the same planes, so it is
    # elongated in z by this factor. 1: isotropic voxels, the frames of earlier versions.
    z_scale: float = 1.0

    def validate(self) -> None:
        """Raise :class:`UserInputError` if the spec cannot be simulated."""
        if not _is_int(self.frames) or self.frames < 1:
            raise UserInputError(
                f"frames must be a whole number >= 1, got {self.frames!r}",
                "ask for at least one frame",
            )
        shape = self.shape
        if (
            not isinstance(shape, (tuple, list))
            or len(shape) not in (2, 3)
            or not all(_is_int(s) for s in shape)
        ):
            raise UserInputError(
                f"shape must be (Y, X) or (Z, Y, X) whole numbers, got {shape!r}",
                "give two sizes for 2D frames or three for 3D frames",
            )
        if any(s < 1 for s in shape):
            raise UserInputError(
                f"every shape entry must be >= 1, got {tuple(shape)!r}",
                "give positive frame sizes",
            )
        if not _is_real(self.z_scale) or not (math.isfinite(self.z_scale) and self.z_scale > 0):
            raise UserInputError(
                f"z_scale must be a positive number, got {self.z_scale!r}",
                "give the z step in pixels, e.g. --z-scale 3",
            )
        if self.z_scale != 1.0 and len(shape) != 3:
            raise UserInputError(
                "--z-scale needs 3D frames", "add --depth Z (the number of planes)"
            )
        if not _is_real(self.diameter) or not math.isfinite(self.diameter):
            raise UserInputError(
                f"diameter must be a number, got {self.diameter!r}", "give a diameter in pixels"
            )
        if self.diameter < _MIN_DIAMETER:
            raise UserInputError(
                f"diameter must be >= {_MIN_DIAMETER:g} pixels, got {self.diameter!r}",
                f"give a nucleus diameter of at least {_MIN_DIAMETER:g} pixels",
            )
        # the frame's extent in pixels (planes count z_scale pixels each)
        extent = [
            s * (self.z_scale if axis == 0 and len(shape) == 3 else 1)
            for axis, s in enumerate(shape)
        ]
        if self.diameter > min(extent):
            raise UserInputError(
                f"diameter {self.diameter:g} is larger than the smallest frame size "
                f"{min(extent):g} of shape {tuple(shape)!r}",
                "use a smaller diameter or a larger frame",
            )
        if not isinstance(self.granules, (bool, np.bool_)):
            raise UserInputError(
                f"granules must be true or false, got {self.granules!r}", "give a boolean"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise UserInputError(
                f"seed must be a whole number >= 0, got {self.seed!r}",
                "give a non-negative integer seed",
            )
        if not _is_real(self.density) or not 0.0 < self.density <= 1.0:
            raise UserInputError(
                f"density must be in (0, 1], got {self.density!r}",
                "give the fraction of the frame covered by nuclei, e.g. 0.35",
            )
        if not _is_real(self.division_rate) or not 0.0 <= self.division_rate <= 1.0:
            raise UserInputError(
                f"division_rate must be in [0, 1], got {self.division_rate!r}",
                "give a chance per nucleus per frame, e.g. 0.03",
            )
        for name, upper in (("texture", 10.0), ("debris", 100.0), ("dim_fraction", 1.0)):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value <= upper:
                raise UserInputError(
                    f"{name} must be in [0, {upper:g}], got {value!r}",
                    f"give e.g. {name}=0.2" if name != "debris" else "give e.g. debris=0.2",
                )


def simulate_frames(
    spec: SimulationSpec,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]:
    """Yield ``(image, labels, divisions)`` one frame at a time.

    ``image`` is a uint16 camera frame of ``spec.shape``; ``labels`` is a uint32 array of the
    same shape, 0 for background and the track ID of each nucleus elsewhere (IDs start at 1,
    persist across frames and are new only for the two daughters of a division);
    ``divisions`` lists the ``(mother_id, daughter_id)`` pairs of the divisions that happened
    just before this frame (two pairs per division, empty for frame 0).

    The spec is validated at once (before the first frame is asked for).
    """
    spec.validate()
    return _generate(spec)


def ground_truth_centres(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Return the centroid (float64, one entry per axis) of every label > 0 in ``labels``."""
    labels = np.asarray(labels)
    if labels.size == 0 or not labels.any():
        return {}
    if labels.min() < 0:
        raise UserInputError(
            "labels must be non-negative", "give a label image with 0 as background"
        )
    flat = labels.ravel().astype(np.intp, copy=False)
    counts = np.bincount(flat)
    present = np.flatnonzero(counts)
    present = present[present > 0]
    sums = np.empty((labels.ndim, present.size))
    for axis, size in enumerate(labels.shape):
        view = [1] * labels.ndim
        view[axis] = size
        coord = np.broadcast_to(np.arange(size, dtype=np.float64).reshape(view), labels.shape)
        sums[axis] = np.bincount(flat, weights=coord.ravel(), minlength=counts.size)[present]
    centres = sums / counts[present]
    return {int(label): centres[:, k].copy() for k, label in enumerate(present)}


# ----------------------------------------------------------------------------- internals


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _generate(
    spec: SimulationSpec,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]:
    sim = _Simulator(spec)
    for t in range(spec.frames):
        divisions = sim.advance(t)
        image, labels = sim.render(t)
        yield image, labels, divisions


class _Simulator:
    """Per-nucleus state (a few arrays of length N) and the frame renderer."""

    _FIELDS = (
        "ids",
        "centre",
        "velocity",
        "axes",
        "target",
        "rotation",
        "brightness",
        "age",
        "blob_pos",
        "blob_width",
        "blob_amp",
    )

    def __init__(self, spec: SimulationSpec) -> None:
        self.spec = spec
        self.shape = tuple(int(s) for s in spec.shape)
        self.ndim = len(self.shape)
        self.diameter = float(spec.diameter)
        # voxel size per axis (in-plane pixels): the state is physical, frames are sampled
        self.spacing = np.ones(self.ndim)
        if self.ndim == 3:
            self.spacing[0] = float(spec.z_scale)
        self.upper = (np.array(self.shape, dtype=np.float64) - 1.0) * self.spacing
        mean_volume = (
            math.pi / 4.0 * self.diameter**2 if self.ndim == 2 else math.pi / 6.0 * self.diameter**3
        )
        self.shape_upper = np.array(self.shape, dtype=np.float64) - 1.0
        volume = math.prod(self.shape) * float(np.prod(self.spacing))
        self.wanted = max(1, round(spec.density * volume / mean_volume))
        self.cap = max(math.ceil(_POPULATION_CAP * self.wanted), self.wanted + 2)
        self.next_id = 1
        self.state: dict[str, np.ndarray] = {}
        self.granule_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.background = self._background()
        self.debris = self._debris() if spec.debris > 0 else []

    # ------------------------------------------------------------------ sampling helpers

    def _unit_ball(self, rng: np.random.Generator, size: tuple[int, ...]) -> np.ndarray:
        """Points uniform in the unit ball, shape ``size + (ndim,)``."""
        direction = rng.standard_normal(size + (self.ndim,))
        norm = np.linalg.norm(direction, axis=-1, keepdims=True)
        direction /= np.maximum(norm, 1e-12)
        radius = rng.random(size + (1,)) ** (1.0 / self.ndim)
        return direction * radius

    def _axes_from(self, diameter: np.ndarray, ratio: np.ndarray) -> np.ndarray:
        """Semi-axes (long first) with the given equivalent diameter and axis ratio."""
        half = diameter / 2.0
        if self.ndim == 2:
            return np.stack([half * np.sqrt(ratio), half / np.sqrt(ratio)], axis=-1)
        long = half * ratio ** (2.0 / 3.0)
        short = half * ratio ** (-1.0 / 3.0)
        return np.stack([long, short, short], axis=-1)

    def _rotations(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Random rotations; column j is the direction of semi-axis j in frame coordinates."""
        if self.ndim == 2:
            angle = rng.uniform(0.0, math.pi, n)
            cos, sin = np.cos(angle), np.sin(angle)
            return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], axis=-2)
        q, r = np.linalg.qr(rng.standard_normal((n, 3, 3)))
        return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]

    def _texture(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        return {
            "blob_pos": 0.9 * self._unit_ball(rng, (n, _TEXTURE_BLOBS)),
            "blob_width": rng.uniform(0.2, 0.4, (n, _TEXTURE_BLOBS)),
            "blob_amp": rng.uniform(-1.0, 1.0, (n, _TEXTURE_BLOBS)),
        }

    def _sample_nuclei(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """Fresh nuclei (without centres or IDs) of size around D."""
        diameter = self.diameter * rng.uniform(1.0 - _SIZE_SPREAD, 1.0 + _SIZE_SPREAD, n)
        ratio = rng.uniform(1.0, _MAX_AXIS_RATIO, n)
        axes = self._axes_from(diameter, ratio)
        fields = {
            "axes": axes,
            "target": axes.copy(),
            "rotation": self._rotations(rng, n),
            "brightness": rng.uniform(*_BRIGHTNESS, n),
            "velocity": np.zeros((n, self.ndim)),
            "age": np.zeros(n, dtype=np.int64),
        }
        fields.update(self._texture(rng, n))
        return fields

    @staticmethod
    def _extent(axes: np.ndarray, rotation: np.ndarray) -> np.ndarray:
        """Half-size of the axis-aligned bounding box of each ellipse, shape (N, ndim)."""
        return np.sqrt(np.sum((rotation * axes[:, None, :]) ** 2, axis=-1))

    @staticmethod
    def _equivalent_diameter(axes: np.ndarray) -> np.ndarray:
        return 2.0 * np.prod(axes, axis=-1) ** (1.0 / axes.shape[-1])

    # ------------------------------------------------------------------------ dynamics

    def advance(self, t: int) -> list[tuple[int, int]]:
        """Move the state to frame ``t``; return the divisions that happened."""
        rng = _rng(self.spec.seed, _STREAM_DYNAMICS, t)
        if t == 0:
            self._place(rng)
            return []
        self.state["age"] = self.state["age"] + 1  # frames since birth
        divisions = self._divide(rng)
        st = self.state
        st["velocity"] = _PERSISTENCE * st["velocity"] + rng.normal(
            0.0, _DRIFT * self.diameter, st["velocity"].shape
        )
        st["centre"] = st["centre"] + st["velocity"]
        st["axes"] = st["axes"] + _GROWTH * (st["target"] - st["axes"])
        self._separate()
        self._keep_inside()
        return divisions

    def _place(self, rng: np.random.Generator) -> None:
        """Random sequential placement of ``wanted`` nuclei without heavy overlap."""
        cell = _START_SPACING * self.diameter * (1.0 + _SIZE_SPREAD)
        grid: dict[tuple[int, ...], list[int]] = {}
        offsets = (
            np.array(np.meshgrid(*[[-1, 0, 1]] * self.ndim, indexing="ij")).reshape(self.ndim, -1).T
        )
        offsets_list = [tuple(int(v) for v in o) for o in offsets]
        kept_fields: list[dict[str, np.ndarray]] = []
        kept_centres: list[np.ndarray] = []
        kept_diameters: list[float] = []
        budget = _PLACEMENT_TRIES * self.wanted + 100
        while len(kept_centres) < self.wanted and budget > 0:
            batch = min(budget, max(16, 2 * (self.wanted - len(kept_centres))))
            budget -= batch
            fields = self._sample_nuclei(rng, batch)
            ext = self._extent(fields["axes"], fields["rotation"])
            low, high = ext, self.upper - ext
            centre = low + rng.random((batch, self.ndim)) * (high - low)
            centre = np.where(high < low, self.upper / 2.0, centre)
            diam = self._equivalent_diameter(fields["axes"])
            accepted = []
            for k in range(batch):
                c = centre[k]
                key = tuple(int(v) for v in np.floor(c / cell))
                ok = True
                for off in offsets_list:
                    for j in grid.get(tuple(a + b for a, b in zip(key, off, strict=True)), ()):
                        limit = _START_SPACING * 0.5 * (diam[k] + kept_diameters[j])
                        if np.sum((kept_centres[j] - c) ** 2) < limit * limit:
                            ok = False
                            break
                    if not ok:
                        break
                if not ok:
                    continue
                grid.setdefault(key, []).append(len(kept_centres))
                kept_centres.append(c)
                kept_diameters.append(float(diam[k]))
                accepted.append(k)
                if len(kept_centres) == self.wanted:
                    break
            idx = np.asarray(accepted, dtype=np.intp)
            chosen = {name: value[idx] for name, value in fields.items()}
            chosen["centre"] = centre[idx]
            kept_fields.append(chosen)
        state = {name: np.concatenate([f[name] for f in kept_fields]) for name in kept_fields[0]}
        n = len(state["centre"])
        state["ids"] = np.arange(1, n + 1, dtype=np.int64)
        self.next_id = n + 1
        self.state = state

    def _divide(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        st = self.state
        n = len(st["ids"])
        draw = rng.random(n)
        mothers = np.flatnonzero((draw < self.spec.division_rate) & (st["age"] >= 1))
        mothers = mothers[: max(0, self.cap - n)]
        m = mothers.size
        if m == 0:
            return []
        scale = 0.5 ** (1.0 / self.ndim)  # each daughter has half the mother's volume
        perm = [1, 0] if self.ndim == 2 else [1, 0, 2]
        axes = np.repeat(st["axes"][mothers] * scale, 2, axis=0)
        # Daughters lie side by side along the mother's long axis, their long axes across it.
        rotation = np.repeat(st["rotation"][mothers][:, :, perm], 2, axis=0)
        direction = np.repeat(st["rotation"][mothers][:, :, 0], 2, axis=0)
        sign = np.tile([1.0, -1.0], m)[:, None]
        centre = np.repeat(st["centre"][mothers], 2, axis=0)
        centre = centre + sign * direction * (1.02 * axes[:, 1:2])
        wanted = self.diameter * rng.uniform(1.0 - _SIZE_SPREAD, 1.0 + _SIZE_SPREAD, 2 * m)
        target = axes * (wanted / self._equivalent_diameter(axes))[:, None]
        brightness = np.repeat(st["brightness"][mothers], 2) * rng.uniform(0.95, 1.15, 2 * m)
        brightness = np.clip(brightness, _BRIGHTNESS[0] * 0.9, _BRIGHTNESS[1] * 1.1)
        ids = np.arange(self.next_id, self.next_id + 2 * m, dtype=np.int64)
        self.next_id += 2 * m
        daughters = {
            "ids": ids,
            "centre": centre,
            "velocity": np.repeat(st["velocity"][mothers], 2, axis=0),
            "axes": axes,
            "target": target,
            "rotation": rotation,
            "brightness": brightness,
            "age": np.zeros(2 * m, dtype=np.int64),
        }
        daughters.update(self._texture(rng, 2 * m))
        mother_ids = st["ids"][mothers]
        keep = np.ones(n, dtype=bool)
        keep[mothers] = False
        self.state = {
            name: np.concatenate([st[name][keep], daughters[name]]) for name in self._FIELDS
        }
        for mother in mother_ids:
            self.granule_cache.pop(int(mother), None)
        return [(int(mother_ids[k]), int(ids[2 * k + j])) for k in range(m) for j in range(2)]

    def _separate(self, iterations: int = 3) -> None:
        """Push apart neighbours closer than the motion spacing (small overlap is fine)."""
        st = self.state
        if len(st["ids"]) < 2:
            return
        diam = self._equivalent_diameter(st["axes"])
        reach = _MOTION_SPACING * float(diam.max())
        centre = st["centre"]
        for _ in range(iterations):
            pairs = cKDTree(centre).query_pairs(reach, output_type="ndarray")
            if pairs.size == 0:
                break
            i, j = pairs[:, 0], pairs[:, 1]
            delta = centre[i] - centre[j]
            dist = np.linalg.norm(delta, axis=1)
            need = _MOTION_SPACING * 0.5 * (diam[i] + diam[j])
            close = dist < need
            if not close.any():
                break
            i, j, delta, dist, need = i[close], j[close], delta[close], dist[close], need[close]
            tiny = dist < 1e-6
            delta[tiny] = np.eye(self.ndim)[-1]
            dist[tiny] = 1.0
            push = (0.5 * (need - dist) / dist)[:, None] * delta
            np.add.at(centre, i, push)
            np.add.at(centre, j, -push)
        st["centre"] = centre

    def _keep_inside(self) -> None:
        """Bounce nuclei off the frame borders so that each stays wholly inside."""
        st = self.state
        ext = self._extent(st["axes"], st["rotation"])
        low, high = ext, self.upper - ext
        centre, velocity = st["centre"], st["velocity"]
        below, above = centre < low, centre > high
        centre = np.where(below, 2 * low - centre, centre)
        centre = np.where(above, 2 * high - centre, centre)
        velocity = np.where(below | above, -velocity, velocity)
        centre = np.clip(centre, low, np.maximum(low, high))
        centre = np.where(high < low, self.upper / 2.0, centre)
        st["centre"], st["velocity"] = centre, velocity

    # ----------------------------------------------------------------------- rendering

    def _background(self) -> np.ndarray:
        """Smooth uneven background (photo-electrons): a gradient plus a few broad blobs."""
        rng = _rng(self.spec.seed, _STREAM_BACKGROUND)
        base = rng.uniform(40.0, 70.0)
        coords = []
        for axis, size in enumerate(self.shape):
            view = [1] * self.ndim
            view[axis] = size
            coords.append((np.arange(size, dtype=np.float32) / max(size - 1, 1)).reshape(view))
        background = np.full(self.shape, base, dtype=np.float32)
        slope = rng.uniform(-0.3, 0.3, self.ndim) * base
        for axis in range(self.ndim):
            background += np.float32(slope[axis]) * (coords[axis] - np.float32(0.5))
        for _ in range(int(rng.integers(3, 6))):
            where = rng.random(self.ndim)
            width = rng.uniform(0.1, 0.35)
            amplitude = rng.uniform(10.0, 40.0)
            blob = np.float32(amplitude)
            for axis in range(self.ndim):
                blob = blob * np.exp(-0.5 * ((coords[axis] - where[axis]) / width) ** 2)
            background += blob
        if self.spec.texture > 0:
            background += self._texture_field()
        return background

    def _texture_field(self) -> np.ndarray:
        """Structured background: smooth random ridges about a third of a nucleus wide, peaking at
        ``texture`` x the mean nucleus brightness."""
        rng = _rng(self.spec.seed, _STREAM_TEXTURE)
        noise = rng.standard_normal(self.shape).astype(np.float32)
        field = ndimage.gaussian_filter(noise, tuple(_TEXTURE_SCALE * self.diameter / self.spacing))
        field = np.maximum(field / max(float(field.std()), 1e-12), 0.0)
        peak = float(np.percentile(field, 99.9)) or 1.0
        return np.float32(self.spec.texture * np.mean(_BRIGHTNESS) / peak) * field

    def _debris(self) -> list[tuple[np.ndarray, float, float]]:
        """Debris particles (centre, sigma, peak), fixed for the video: not nuclei, not labelled."""
        count = round(self.spec.debris * self.wanted)
        rng = _rng(self.spec.seed, _STREAM_DEBRIS)
        centres = rng.random((count, self.ndim)) * self.upper
        size = rng.uniform(*_DEBRIS_SIZE, count) * self.diameter
        gain = rng.uniform(*_DEBRIS_GAIN, count) * float(np.mean(_BRIGHTNESS))
        return [(centres[k], size[k] / 2.0, gain[k]) for k in range(count)]

    def _add_debris(self, signal: np.ndarray) -> None:
        for centre, sigma, gain in self.debris:
            step = self.spacing
            low = np.maximum(np.floor((centre - 3 * sigma) / step), 0).astype(np.intp)
            high = np.minimum(np.ceil((centre + 3 * sigma) / step) + 1, self.shape).astype(np.intp)
            box = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
            grids = np.ogrid[box]
            distance2 = sum((g * d - c) ** 2 for g, d, c in zip(grids, step, centre, strict=True))
            signal[box] += np.float32(gain) * np.exp(-0.5 * distance2 / sigma**2).astype(np.float32)

    def _brightness_gain(self, nucleus_id: int) -> float:
        """1 for most nuclei; for a ``dim_fraction`` share of them, a quarter to a third."""
        if self.spec.dim_fraction <= 0:
            return 1.0
        rng = _rng(self.spec.seed, _STREAM_DIM, nucleus_id)
        dim, gain = rng.random() < self.spec.dim_fraction, rng.uniform(*_DIM_GAIN)
        return float(gain) if dim else 1.0

    def _granules(self, nucleus_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Granules of one nucleus: positions in nucleus units, sigmas (px), gains."""
        cached = self.granule_cache.get(nucleus_id)
        if cached is None:
            rng = _rng(self.spec.seed, _STREAM_GRANULES, nucleus_id)
            count = int(rng.integers(*_GRANULE_COUNT))
            pos = 0.75 * self._unit_ball(rng, (count,))
            sigma = rng.uniform(*_GRANULE_FWHM, count) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
            gain = rng.uniform(*_GRANULE_GAIN, count)
            cached = (pos, sigma, gain)
            self.granule_cache[nucleus_id] = cached
        return cached

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw the current state: return the uint16 image and the uint32 labels."""
        st = self.state
        signal = np.zeros(self.shape, dtype=np.float32)
        best = np.full(self.shape, np.inf, dtype=np.float32)
        labels = np.zeros(self.shape, dtype=np.uint32)
        extent = self._extent(st["axes"], st["rotation"])
        step = self.spacing
        low = np.maximum(np.ceil((st["centre"] - extent) / step), 0).astype(np.intp)
        high = (
            np.minimum(np.floor((st["centre"] + extent) / step), self.upper / step).astype(np.intp)
            + 1
        )
        for k in range(len(st["ids"])):
            self._draw(k, low[k], high[k], signal, best, labels)
        self._ensure_present(signal, labels)
        self._add_debris(signal)
        sigma = (_PSF_SIGMA,) * 2 if self.ndim == 2 else (_PSF_SIGMA_Z, _PSF_SIGMA, _PSF_SIGMA)
        expected = ndimage.gaussian_filter(signal, sigma, mode="nearest")
        del signal, best
        expected += self.background
        np.maximum(expected, 0.0, out=expected)
        rng = _rng(self.spec.seed, _STREAM_NOISE, t)
        counts = rng.poisson(expected).astype(np.float32)
        del expected
        counts += rng.standard_normal(self.shape, dtype=np.float32) * np.float32(_READ_NOISE)
        counts += np.float32(_CAMERA_OFFSET)
        np.rint(counts, out=counts)
        np.clip(counts, 0, _MAX_COUNT, out=counts)
        return counts.astype(np.uint16), labels

    def _draw(
        self,
        k: int,
        low: np.ndarray,
        high: np.ndarray,
        signal: np.ndarray,
        best: np.ndarray,
        labels: np.ndarray,
    ) -> None:
        """Paint nucleus ``k`` inside its bounding box.

        A pixel belongs to the nucleus in whose normalised radius it lies deepest, so where
        nuclei overlap the ground truth stays a partition and the image shows the owner.
        """
        if np.any(high <= low):
            return
        st = self.state
        centre, axes, rotation = st["centre"][k], st["axes"][k], st["rotation"][k]
        box = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
        offsets = []
        for axis in range(self.ndim):
            view = [1] * self.ndim
            view[axis] = int(high[axis] - low[axis])
            planes = np.arange(low[axis], high[axis]) * self.spacing[axis]
            offsets.append((planes - centre[axis]).reshape(view))
        unit = [
            sum(offsets[axis] * (rotation[axis, j] / axes[j]) for axis in range(self.ndim))
            for j in range(self.ndim)
        ]
        radius2 = sum(u * u for u in unit)
        box_best = best[box]
        inside = (radius2 <= 1.0) & (radius2 < box_best)
        if not inside.any():
            return
        u_in = np.stack([np.broadcast_to(u, inside.shape)[inside] for u in unit], axis=-1)
        blob = np.exp(
            -0.5
            * np.sum((u_in[None, :, :] - st["blob_pos"][k][:, None, :]) ** 2, axis=-1)
            / (st["blob_width"][k][:, None] ** 2)
        )
        texture = 1.0 + _TEXTURE_STRENGTH * (st["blob_amp"][k] @ blob)
        value = np.clip(texture, *_TEXTURE_RANGE)
        if self.spec.granules:
            pos, sigma, gain = self._granules(int(st["ids"][k]))
            where = (pos * axes) @ rotation.T  # pixel offsets from the centre
            d_in = np.stack([np.broadcast_to(o, inside.shape)[inside] for o in offsets], axis=-1)
            spots = np.exp(
                -0.5
                * np.sum((d_in[None, :, :] - where[:, None, :]) ** 2, axis=-1)
                / (sigma[:, None] ** 2)
            )
            value = value + gain @ spots
        box_best[inside] = radius2[inside]
        labels[box][inside] = st["ids"][k]
        gain = st["brightness"][k] * self._brightness_gain(int(st["ids"][k]))
        signal[box][inside] = gain * value

    def _ensure_present(self, signal: np.ndarray, labels: np.ndarray) -> None:
        """Give any nucleus that lost all its pixels to neighbours its centre pixel."""
        st = self.state
        counts = np.bincount(labels.ravel(), minlength=self.next_id)
        missing = np.flatnonzero(counts[st["ids"]] == 0)
        for k in missing:
            pixel = tuple(
                int(v)
                for v in np.clip(
                    np.rint(st["centre"][k] / self.spacing), 0, self.shape_upper
                ).astype(np.intp)
            )
            labels[pixel] = st["ids"][k]
            signal[pixel] = max(float(signal[pixel]), float(st["brightness"][k]))
