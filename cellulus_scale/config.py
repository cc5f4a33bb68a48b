"""One configuration object for cellulus-scale; every default is stated here once.

Parameters that the paper derives from the expected object diameter ``d`` (mean-shift
bandwidth, minimum object size, post-processing distances, clustering halo) are derived
properties of :class:`SegmentationConfig`, never separate settings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

from cellulus_scale.errors import UserInputError

Damping = Literal["seed", "reference"]
Mode = Literal["cell", "nucleus", "none"]
NucleusThreshold = Literal["auto", "otsu", "log-otsu", "li"]
StdThreshold = Literal["auto", "otsu", "log-otsu"]
Precision = Literal["float32", "tf32", "bfloat16"]
PRECISIONS: tuple[str, ...] = ("float32", "tf32", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """The mini U-Net: valid convolutions, blocks of [3x3, 1x1, 1x1, 3x3] with ReLU."""

    spatial_dims: int = 2
    in_channels: int = 1
    depth: int = 1
    feature_maps: int = 64
    feature_factor: int = 3
    out_channels: int | None = None  # None: one output per spatial dimension (OCE offsets)
    # The voxel size per spatial axis in in-plane pixels (3D: (z step, 1, 1)); None: isotropic.
    # OCE offsets are predicted in these units (physical space, in in-plane pixels).
    spacing: tuple[float, ...] | None = None
    # StarDist's grid (2D): the network sees the image in g x g cells (space-to-depth, so
    # nothing is lost) and predicts at every g-th pixel: g^2 times fewer network pixels and a
    # field of view g times wider. 1: every pixel.
    grid: int = 1
    # 3D: the bottom level, too, may convolve 1x3x3 (a z step of 4 px or more at depth 1), so
    # that a stack of a few widely spaced planes trains. False: checkpoints written before it
    # could, whose bottom level always convolves 3x3x3.
    flat_bottom: bool = True
    # 3D StarDist models: rays spread evenly in physical space (StarDist's anisotropy, from
    # ``spacing``). False: checkpoints written before, whose rays are even in voxels.
    physical_rays: bool = True

    @property
    def outputs(self) -> int:
        return self.spatial_dims if self.out_channels is None else self.out_channels

    @property
    def flat_levels(self) -> int:
        """The first levels that pool (1, 2, 2) and convolve 1x3x3 (3D only): those where the z
        step is still at least :data:`ANISOTROPY_FACTOR` times the level's in-plane pixel, as
        anisotropic 3D U-Nets do; 0 for isotropic data and 2D. ``depth + 1`` (every level, the
        bottom included, with ``flat_bottom``): the network never mixes planes."""
        if self.spatial_dims != 3 or self.spacing is None:
            return 0
        ratio = float(self.spacing[0]) / float(min(self.spacing[1:]))
        levels = 0
        most = self.depth + 1 if self.flat_bottom else self.depth
        while levels < most and ratio / 2**levels >= ANISOTROPY_FACTOR:
            levels += 1
        return levels

    @property
    def ray_anisotropy(self) -> tuple[float, float, float] | None:
        """StarDist's anisotropy for this model's 3D rays: the voxel size over its smallest side
        (e.g. (2.18, 1, 1)); None for 2D, isotropic voxels and checkpoints without it."""
        if self.spatial_dims != 3 or self.spacing is None or not self.physical_rays:
            return None
        smallest = float(min(self.spacing))
        ratio = tuple(float(s) / smallest for s in self.spacing)
        return None if all(r == 1.0 for r in ratio) else (ratio[0], ratio[1], ratio[2])

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if self.spacing is None:  # checkpoints of isotropic data keep their earlier layout
            del values["spacing"], values["flat_bottom"], values["physical_rays"]
        else:
            values["spacing"] = [float(v) for v in self.spacing]
        if self.grid == 1:
            del values["grid"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        values = dict(values)
        if values.get("spacing") is not None:
            values.setdefault("flat_bottom", False)  # written before the bottom could be flat
            values.setdefault("physical_rays", False)  # written before rays followed the voxel
            values["spacing"] = tuple(float(v) for v in values["spacing"])
        return cls(**values)


#: A level of a 3D U-Net pools and convolves only in-plane while the z step is at least this many
#: times its in-plane pixel (e.g. a z step of 2.18 px: the first level; of 5 px: the first two).
ANISOTROPY_FACTOR = 2.0


@dataclass(frozen=True)
class CropTraining:
    """What every training run shares: random crops, Adam with step decay, normalisation.

    An epoch is enough crops to cover every pixel of the data once, at least
    ``min_crops_per_epoch`` and, where set, at most ``max_crops_per_epoch``. The learning rate
    drops by ``lr_gamma`` once ``lr_drops`` (fractions) of the run's steps are done: (0.4, 0.6)
    of 50 epochs is after epochs 20 and 30, the seed's schedule, and ``--epochs`` or a time
    budget scale it.
    """

    crop_size: int = 252  # the crop side in pixels (in-plane side for 3D images)
    # 3D images: the in-plane crop side unless --crop-size is given (cubes of ``crop_size``
    # would not fit a thin stack or a CPU step), and the planes per crop (None: the physical
    # extent of the in-plane side, at most the whole stack, so a thin stack trains whole in z)
    volume_crop_size: int = 96
    crop_depth: int | None = None
    batch_size: int = 8
    learning_rate: float = 4e-5
    epochs: int = 50
    lr_drops: tuple[float, ...] = (0.4, 0.6)
    lr_gamma: float = 0.1
    min_crops_per_epoch: int = 400
    max_crops_per_epoch: int | None = None
    num_workers: int | None = None  # DataLoader processes; None: 2 on the CPU, up to 8 on a GPU
    seed: int = 0
    normalisation_percentiles: tuple[float, float] = (1.0, 99.8)
    normalisation_samples: int = 32

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["lr_drops"] = list(self.lr_drops)
        values["normalisation_percentiles"] = list(self.normalisation_percentiles)
        return values


@dataclass(frozen=True)
class TrainConfig(CropTraining):
    """Self-supervised OCE training (seed, Appendix A)."""

    tau: float = 10.0
    lambda_reg: float = 1e-5
    kappa: float = 10.0
    pair_fraction: float = 0.2
    damping: Damping = "seed"
    elastic: bool = False


@dataclass(frozen=True)
class Preset:
    """A named pair of model and training settings."""

    name: str
    model: ModelConfig
    train: TrainConfig | SupervisedConfig
    description: str


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper",
        ModelConfig(),
        TrainConfig(),
        "the paper's settings: 64 feature maps, Adam 4e-5, 50 epochs, batches of 8 252x252 crops",
    ),
    # Chosen on real data (README, "Accuracy on real images"): 32 feature maps segmented every
    # training seed well where 16 failed one seed of three; accuracy plateaus by 400 steps on a
    # 512x512 image. The epoch cap keeps large videos within about 10 minutes on 2 cores.
    "cpu": Preset(
        "cpu",
        ModelConfig(feature_maps=32),
        # 3D: 64 px in-plane crops, chosen on real data (README, "3D"): on the embryo, 48 px
        # crops (anchors only 12 px in-plane within the kappa margin) matched no nucleus after 10
        # minutes, where 64 px crops put one object on each of the 8.
        TrainConfig(
            crop_size=124,
            volume_crop_size=64,
            batch_size=4,
            learning_rate=1e-3,
            epochs=10,
            lr_drops=(0.6, 0.8),
            min_crops_per_epoch=160,
            max_crops_per_epoch=1600,
        ),
        "small and fast for 2 CPU cores: 32 feature maps, 124x124 crops, Adam 1e-3, 10 epochs"
        " of 160 to 1600 crops",
    ),
}

#: Objects smaller than this (pixels across) are below what the network learns to resolve: the
#: loss pairs pixels up to kappa apart, so an object narrower than kappa is mostly paired with
#: its neighbours. Set by the method, not chosen on data; the simulated object-size table
#: (README, "Object sizes": F1 0.94 to 1.00 from 12 to 160 px, 0.55 to 0.60 at 8 px) agrees.
SMALLEST_RESOLVED_DIAMETER = TrainConfig.kappa

#: ``predict`` without ``--model`` trains on its input; on a CPU within this many minutes by
#: default (with the cpu preset: its whole schedule for images up to a few megapixels).
SELF_TRAINING_CPU_MINUTES = 10.0

#: torch's CPU threads for each network task, on every worker. Fixed, not the worker's share of
#: its host: the sums inside a convolution follow the thread count (outputs differ by ~5e-7
#: between 1 and 2 threads), and the compact intermediate turns such a difference at a rounding
#: step into a label change, so a count that followed the cluster's layout would make labels
#: depend on the number of workers. Parallelism comes from running blocks side by side (the
#: embedded cluster: one single-threaded worker per core).
NETWORK_TASK_THREADS = 1

#: ``--preset auto``: the paper's settings where a GPU trains, the cpu preset elsewhere.
AUTO_PRESET = "auto"

#: The NGFF version of a new output (``predict --ngff``): 0.4 (zarr v2), which every OME-Zarr
#: viewer reads, until viewers read 0.5 (zarr v3, sharded) as widely (README, "Data layout").
NGFF_VERSION = "0.4"
NGFF_VERSIONS = ("0.4", "0.5")


def auto_preset(device_type: str) -> str:
    """The preset ``auto`` stands for on a device of ``device_type`` ('cuda' or 'cpu')."""
    return "paper" if device_type == "cuda" else "cpu"


@dataclass(frozen=True)
class SupervisedConfig(CropTraining):
    """Supervised refinement (seed, Appendix B): the StarDist objective on given labels.

    Shares :class:`CropTraining` with :class:`TrainConfig` (Appendix B's optimiser settings as
    defaults); the loss is BCE on the per-pixel object probability (normalised distance to the
    object's border) plus ``dist_weight`` x the probability-weighted mean absolute error of the
    ``n_rays`` star-convex radial distances (+ ``reg_weight`` x their square on background).
    """

    learning_rate: float = 1e-5
    epochs: int = 200
    lr_drops: tuple[float, ...] = (0.15, 0.4, 0.8)  # after epochs 30, 80 and 160 of 200
    labels: str = "cellulus"
    n_rays: int = 32
    dist_weight: float = 0.2
    reg_weight: float = 1e-4
    ignore_cut_objects: bool = True  # objects touching the crop border do not enter the loss
    # pseudo-label hygiene: objects outside this range of sizes (multiples of the labels' median
    # object size) or less solid than this (share of the convex hull) leave the loss; None: all
    trusted_size: tuple[float, float] | None = None
    trusted_solidity: float | None = None


#: ``refine``'s pseudo-label hygiene (:class:`SupervisedConfig` fields): the teacher's objects
#: of unusual size or shape (merged neighbours, fragments) leave the loss instead of being
#: taught. Chosen on real data (README, "Supervised refinement": F1 +0.07 after 600 steps,
#: SEG +0.01 and AP +0.03 after 10 minutes, on BBBC039).
REFINE_HYGIENE: dict[str, Any] = {"trusted_size": (0.25, 4.0), "trusted_solidity": 0.85}

#: ``refine``'s object probability threshold (StarDist's ``prob_thresh``; other StarDist models
#: keep :attr:`SegmentationConfig.prob_threshold`). A student trained for minutes on
#: pseudo-labels is less sure of small and cut nuclei than a fully trained model, whose
#: optimised thresholds StarDist reports near 0.5. Chosen on real data (README, "The student at
#: the frame's border": 0.4 against 0.5 gave SEG +0.004 and +0.007 on 50 and 16 BBBC039 fields,
#: F1 +0 and +0.003, AP -0.001 and +0; 0.3 no better).
REFINE_PROB_THRESHOLD = 0.4

SUPERVISED_DEPTH = 3
CPU_SUPERVISED_DEPTH = 2  # on StarDist's grid of 2: the field of view of depth 3 without it
SUPERVISED_PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper",
        ModelConfig(depth=SUPERVISED_DEPTH, out_channels=1 + SupervisedConfig.n_rays),
        SupervisedConfig(),
        "the paper's settings (Appendix B): depth 3, 64 feature maps, Adam 1e-5, 200 epochs,"
        " x0.1 at 30, 80 and 160, batches of 8 252x252 crops",
    ),
    # Chosen on real data (README, "Supervised refinement"): on BBBC039 a student with 8
    # feature maps and 10 epochs (600 steps, 86 s) scored F1 0.59 against its teacher's 0.92;
    # 32 maps trained for the refinement's 10 minutes (about 2,000 steps) scored 0.92. StarDist's
    # grid of 2 (its 2D default) with depth 2 (the same 40 px field of view per side as depth 3
    # without it) trains 2.1x the steps in those 10 minutes, 2.7x the area each: on BBBC039 the
    # student then beat its teacher on F1, SEG and AP, where depth 3 without a grid trailed it
    # on SEG (table "The student on a grid"). The epochs are more than 10 minutes hold on a
    # typical video: a time budget fits the schedule.
    "cpu": Preset(
        "cpu",
        ModelConfig(
            depth=CPU_SUPERVISED_DEPTH,
            feature_maps=32,
            feature_factor=2,
            out_channels=1 + SupervisedConfig.n_rays,
            grid=2,
        ),
        SupervisedConfig(
            crop_size=192,
            batch_size=4,
            learning_rate=1e-3,
            epochs=100,
            lr_drops=(0.6, 0.8),
            min_crops_per_epoch=160,
        ),
        "for 2 CPU cores within a time budget (refine: 10 minutes): StarDist's grid of 2,"
        " depth 2, 32 feature maps x2 per level, 192x192 crops, Adam 1e-3, 100 epochs",
    ),
}

#: Objects narrower than this (pixels) are segmented by ``refine``'s cpu student without a grid
#: (every pixel): on a grid of 2 they would span fewer than 8 of the network's output points.
GRID_MIN_DIAMETER = 16.0


@dataclass(frozen=True)
class SegmentationConfig:
    """Inference settings; everything scale-dependent follows from ``diameter`` (pixels)."""

    diameter: float
    tta_passes: int = 8  # accuracy stops improving here (README, "Test-time augmentation")
    noise_fraction: float = 0.01
    noise_values: tuple[float, ...] = (0.5, 1.0)
    fit_fraction: float = 0.1
    threshold: float | None = None
    # The foreground rule: Otsu's threshold of the embeddings' std over the video, of the std
    # itself ('otsu', the paper's) or of its logarithm ('log-otsu'). 'auto' (the default) is Otsu
    # in 2D and log-Otsu in 3D, chosen on real data (README, "3D", the table "The foreground rule
    # in 3D"): a volume's nuclei are a small share of its voxels (2.3% of the real embryo's, 18
    # to 20% of the 2D sets' pixels), and Otsu's threshold of the std then falls inside the
    # background's bulk; log-Otsu scored the higher F1 on the embryo with two models, Otsu the
    # higher F1 and SEG on the held-out real 2D image.
    std_threshold: StdThreshold = "auto"
    # Chosen on real data (README, "Accuracy on real images"): nucleus outlines from the
    # intensity inside each object; 'cell' (the paper's grow/shrink) cuts nuclei short there.
    # StarDist models too, their polygons grown by d/4 first: chosen on real data (README,
    # "Supervised refinement", the table "The teacher's outline rule on the student's objects").
    mode: Mode = "nucleus"
    # 'nucleus' mode's threshold inside each object: Otsu of the intensities (the paper), of
    # their logarithm ('log-otsu'), or Li's minimum cross-entropy ('li'). 'auto' (the default) is
    # Otsu in 2D and Li in 3D, chosen on real data (README, "Accuracy on real images", the
    # table "The nucleus threshold"): Otsu scored the higher SEG and AP on both real 2D sets, Li
    # on the real embryo, whose z-blurred rims and bright chromocentres Otsu cuts off.
    nucleus_threshold: NucleusThreshold = "auto"
    # Objects must stand this many standard deviations of their surroundings above them (their
    # mean intensity against a ring of d/4 around them); None keeps every object. Chosen on real
    # data (README, "Accuracy on real images"): it removes the speckle objects that unstable
    # background embeddings form, and no nucleus of the real sets falls under it.
    min_contrast: float | None = 1.0
    clustering: Literal["meanshift", "sklearn"] = "meanshift"
    # the network's arithmetic on a GPU: float32 gives the same OCEs for any block size;
    # tf32 and bfloat16 are faster and differ by up to ~0.05 px between block sizes
    precision: Precision = "float32"
    seed: int = 0
    prob_threshold: float = 0.5  # StarDist models: candidates where the probability exceeds it
    nms_threshold: float = 0.4  # StarDist models: overlap above which a candidate is suppressed
    # The OCEs kept between a run's stages (README, "Data layout"): offsets in fixed point of
    # diameter / offset_steps (0.44 px for d = 28, a 32nd of the mean-shift bandwidth), and the std
    # as its histogram bin // std_bins_per_code, so the Otsu threshold falls on a multiple of
    # std_bins_per_code of the 4096 log-spaced bins (every 8.4% of std).
    offset_steps: int = 64
    std_bins_per_code: int = 16

    def __post_init__(self) -> None:
        if not math.isfinite(self.diameter) or self.diameter <= 0:
            raise UserInputError(
                f"object diameter must be a positive number of pixels, got {self.diameter}",
                "pass --diameter D with the typical cell diameter in pixels (e.g. 24)",
            )
        if self.tta_passes < 1:
            raise UserInputError(
                f"--tta must be at least 1, got {self.tta_passes}", "use e.g. --tta 32"
            )
        if self.nucleus_threshold not in get_args(NucleusThreshold):
            raise UserInputError(
                f"unknown nucleus threshold '{self.nucleus_threshold}'",
                "use auto, otsu, log-otsu or li",
            )
        if self.std_threshold not in get_args(StdThreshold):
            raise UserInputError(
                f"unknown std threshold '{self.std_threshold}'", "use auto, otsu or log-otsu"
            )
        if self.precision not in PRECISIONS:
            raise UserInputError(
                f"unknown precision '{self.precision}'", f"use one of {', '.join(PRECISIONS)}"
            )
        for name, value in (("prob", self.prob_threshold), ("nms", self.nms_threshold)):
            if not 0.0 < value < 1.0:
                raise UserInputError(
                    f"--{name}-threshold must lie between 0 and 1, got {value}",
                    f"use e.g. --{name}-threshold {0.5 if name == 'prob' else 0.4}",
                )

    def nucleus_threshold_for(self, spatial_dims: int) -> str:
        """'nucleus' mode's threshold inside each object for images of ``spatial_dims``."""
        if self.nucleus_threshold != "auto":
            return self.nucleus_threshold
        return "li" if spatial_dims == 3 else "otsu"

    def std_threshold_for(self, spatial_dims: int) -> str:
        """The foreground rule ('otsu' or 'log-otsu') for images of ``spatial_dims``."""
        if self.std_threshold != "auto":
            return self.std_threshold
        return "log-otsu" if spatial_dims == 3 else "otsu"

    @property
    def bandwidth(self) -> float:
        """Mean-shift bandwidth: half the diameter."""
        return 0.5 * self.diameter

    @property
    def offset_step(self) -> float:
        """The fixed-point step of the offsets kept between stages (pixels)."""
        return self.diameter / self.offset_steps

    @property
    def clustering_halo(self) -> int:
        """Context read around a block's core for clustering: one diameter."""
        return int(math.ceil(self.diameter))

    @property
    def contrast_ring(self) -> int:
        """Width of the ring around an object that its contrast is measured against: d/4."""
        return max(1, int(math.ceil(self.diameter / 4.0)))

    @property
    def labelling_halo(self) -> int:
        """Context read around a block's core for labelling: one diameter and the contrast ring,
        so that every object touching the core is seen whole, with its ring."""
        return self.clustering_halo + self.contrast_ring

    @property
    def grow_distance(self) -> float:
        """'cell' post-processing: grow by d/8 (3 px for d = 24)."""
        return self.diameter / 8.0

    @property
    def shrink_distance(self) -> float:
        """'cell' post-processing: then erode by d/4 (6 px for d = 24)."""
        return self.diameter / 4.0

    @property
    def assign_distance(self) -> float:
        """A foreground pixel farther than this from every centre stays background."""
        return self.diameter

    def min_size(self, spatial_dims: int) -> float:
        """Smallest kept object: 0.1 x the area (2D) or volume (3D) of a disc of diameter d."""
        radius = self.diameter / 2.0
        if spatial_dims == 3:
            return 0.1 * 4.0 / 3.0 * math.pi * radius**3
        return 0.1 * math.pi * radius**2

    def with_updates(self, **changes: Any) -> SegmentationConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class TrackingConfig:
    """Linking the objects of a video over time (``link``, ``predict --link``). Distances are
    in pixels; shares and ratios are of pixel counts (areas, or volumes in 3D)."""

    max_gap: int = 2  # frames an object may be missing and still keep its track
    # centroid displacement beyond which objects that do not overlap are never linked (also the
    # reach of gap closing); None: the diameter of the median object of the video
    max_distance: float | None = None
    min_iou: float = 0.05  # overlapping pairs below this IoU count only by their distance
    distance_weight: float = 0.5  # bonus of a pair at distance 0 (falls to 0 at max_distance)
    # A division: one object of frame t covered by two smaller objects of frame t+1 that lie
    # mostly inside it. A segmentation error (two nuclei merged in t, apart in t+1) has the same
    # pattern. These bounds were set on simulated divisions only (README, "Tracking"): the
    # shared real data hold no annotated time-lapse to choose them on; check them on one.
    division_inside: float = 0.4  # share of each daughter inside the mother, at least
    division_cover: float = 0.5  # share of the mother the two daughters cover, at least
    division_area: tuple[float, float] = (0.5, 1.6)  # daughters' summed area / mother's area
    division_daughter: float = 0.85  # each daughter's area / mother's area, at most
    division_max_iou: float = 0.55  # a daughter overlapping the mother more continues it
    # frames the daughters must stay apart: a division whose daughters merge again sooner is one
    # nucleus the segmentation cut in two
    division_persist: int = 2
    # frames a track remembers an object that ended inside it (two nuclei segmented as one):
    # if it splits within them, that is the two parting, not a division
    merge_window: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.max_gap, int) or self.max_gap < 0:
            raise UserInputError(
                f"--max-gap must be a whole number of frames >= 0, got {self.max_gap}",
                "use e.g. --max-gap 2 (0 closes no gaps)",
            )
        if self.max_distance is not None and not (
            math.isfinite(self.max_distance) and self.max_distance > 0
        ):
            raise UserInputError(
                f"--max-distance must be a positive number of pixels, got {self.max_distance}",
                "give the largest displacement of an object between frames (e.g. 24)",
            )

    def with_distance(self, typical_diameter: float) -> TrackingConfig:
        """These settings with ``max_distance`` set (the typical diameter where unset)."""
        if self.max_distance is not None:
            return self
        return replace(self, max_distance=max(1.0, float(typical_diameter)))

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def default_of(config: type, name: str) -> Any:
    """The default of a configuration field, so that callers never restate it."""
    return config.__dataclass_fields__[name].default
