"""The ``cellulus-scale`` command line: parses options and calls the library, nothing more."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import click

from cellulus_scale import __version__
from cellulus_scale.config import (
    NGFF_VERSION,
    NGFF_VERSIONS,
    PRECISIONS,
    REFINE_PROB_THRESHOLD,
    SELF_TRAINING_CPU_MINUTES,
    NucleusThreshold,
    SegmentationConfig,
    StdThreshold,
    TrackingConfig,
    default_of,
)
from cellulus_scale.errors import UserInputError


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def user_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input becomes one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except UserInputError as error:
            _fail(str(error))
        except KeyboardInterrupt:
            _fail(
                "interrupted; an unfinished output is marked incomplete (rerun with --resume)", 130
            )
        except MemoryError:
            _fail("out of memory; use a smaller --block-size or fewer --workers")
        except OSError as error:
            reason = error.strerror or str(error)
            where = f" ({error.filename})" if error.filename else ""
            _fail(f"{reason}{where}; check the path, free space and permissions")

    return wrapper


TRAINING_OPTIONS = [
    click.option("--epochs", type=int, default=None, help="Override the preset's epoch count."),
    click.option(
        "--max-minutes",
        type=float,
        default=None,
        help="Time budget: the first steps set the pace, then the whole schedule is fitted into"
        " it (Ctrl-C also stops cleanly and saves, for --resume).",
    ),
    click.option(
        "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
    ),
    click.option("--seed", default=0, show_default=True),
    click.option("--axes", default=None, help="Axis names of a plain zarr array, e.g. tyx."),
    click.option(
        "--crop-size",
        type=int,
        default=None,
        help="Crop side; in-plane side for 3D images (preset default).",
    ),
    click.option("--batch-size", type=int, default=None, help="Crops per batch (preset default)."),
    click.option("--learning-rate", type=float, default=None, help="Adam learning rate."),
    click.option("--feature-maps", type=int, default=None, help="Feature maps of the first level."),
    click.option(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader worker processes (default: 2 on the CPU, up to 8 on a GPU).",
    ),
    click.option(
        "--resume", is_flag=True, help="Continue training MODEL exactly where it stopped."
    ),
    click.option("--overwrite", is_flag=True, help="Replace an existing MODEL."),
]


def training_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The options 'train' and 'train-supervised' share."""
    for option in reversed(TRAINING_OPTIONS):
        function = option(function)
    return function


def given(options: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave: those left at None take the library's (or preset's) default."""
    return {k: v for k, v in options.items() if v is not None}


def _report_training(result: Any) -> None:
    state = "stopped at the time limit" if result.stopped_early else "finished"
    click.echo(
        f"{state}: {result.steps}/{result.total_steps} steps, loss {result.final_loss:.4f},"
        f" {result.seconds:.0f} s, {100 * result.data_wait_fraction:.1f}% waiting for data;"
        f" wrote {result.checkpoint}"
    )


def stardist_options(
    prob_threshold: float = default_of(SegmentationConfig, "prob_threshold"),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options 'predict' and 'refine' share for StarDist models (``prob_threshold``: the
    command's default)."""
    options = [
        click.option(
            "--prob-threshold",
            type=float,
            default=prob_threshold,
            show_default=True,
            help="StarDist models: object probability of a candidate.",
        ),
        click.option(
            "--nms-threshold",
            type=float,
            default=default_of(SegmentationConfig, "nms_threshold"),
            show_default=True,
            help="StarDist models: overlap above which a candidate is suppressed.",
        ),
    ]

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


class StorePath(click.ParamType):
    """A local path, or a URL of object storage (s3://..., https://... to read), kept whole."""

    name = "path|url"

    def shell_complete(self, ctx: Any, param: Any, incomplete: str) -> list[Any]:
        from click.shell_completion import CompletionItem

        return [CompletionItem(incomplete, type="file")]

    def convert(self, value: Any, param: Any, ctx: Any) -> Path | str:
        from cellulus_scale import is_url

        if isinstance(value, Path) or value is None:
            return value
        return str(value) if is_url(value) else Path(value)


STORE = StorePath()


class OptionalFloat(click.ParamType):
    """A number, or 'off' (None)."""

    name = "number|off"

    def convert(self, value: Any, param: Any, ctx: Any) -> float | None:
        if value is None or isinstance(value, float):
            return value
        if str(value).lower() in ("off", "none"):
            return None
        try:
            return float(value)
        except ValueError:
            self.fail(f"'{value}' is neither a number nor 'off'", param, ctx)


class VoxelSize(click.ParamType):
    """Three positive numbers Z,Y,X."""

    name = "Z,Y,X"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[float, ...] | None:
        if value is None or isinstance(value, tuple):
            return value
        try:
            values = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            values = ()
        if len(values) != 3 or not all(v > 0 for v in values):
            self.fail(
                f"'{value}' is not three positive numbers Z,Y,X (e.g. 2.0,0.5,0.5)", param, ctx
            )
        return values


class BlockSize(click.ParamType):
    """One block side for every spatial axis, or one per axis (Z,Y,X or Y,X)."""

    name = "N|Z,Y,X"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | tuple[int, ...] | None:
        if value is None or isinstance(value, (int, tuple)):
            return value
        try:
            sides = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            sides = ()
        if not 1 <= len(sides) <= 3 or not all(v > 0 for v in sides):
            self.fail(
                f"'{value}' is neither a positive whole number nor one per axis (e.g. 16,128,128)",
                param,
                ctx,
            )
        return sides[0] if len(sides) == 1 else sides


VOXEL_SIZE_HELP = (
    "3D: the voxel size Z,Y,X (any one unit), overriding the image's NGFF scale; e.g. 2.0,0.5,0.5."
)


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserInputError(
            f"--shape '{text}' is not a comma-separated list of integers",
            "use e.g. --shape 256,256",
        ) from None


class OneLineErrors(click.Group):
    """A click group whose usage errors are one line (problem and fix), exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        signal.signal(signal.SIGTERM, _interrupt)  # a batch system's stop: as Ctrl-C
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.Abort:
            _fail("aborted", 130)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx else "cellulus-scale"
            _fail(f"{error.format_message().rstrip('.')}; see '{command} --help'")
        except click.ClickException as error:
            _fail(error.format_message())


@click.group(
    cls=OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="\b\nExample:\n  cellulus-scale demo demo_output",
)
@click.version_option(__version__, prog_name="cellulus-scale")
def main() -> None:
    """Unsupervised cell instance segmentation (Cellulus) of OME-Zarr time-lapses on Dask."""


@main.command(
    epilog="\b\nExample:\n  cellulus-scale simulate demo.zarr --frames 5 --shape 256,256 --seed 1"
)
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--frames", default=5, show_default=True, help="Number of time points.")
@click.option("--shape", "shape", default="256,256", show_default=True, help="Frame size Y,X.")
@click.option("--depth", type=int, default=None, help="Add a Z axis of this many planes (3D).")
@click.option(
    "--z-scale",
    type=float,
    default=None,
    help="3D: planes spaced this many pixels apart (anisotropic voxels; blur elongated in z"
    " alike; the NGFF scale says so). Default: 1.",
)
@click.option("--diameter", default=24.0, show_default=True, help="Mean nucleus diameter (px).")
@click.option("--granules", is_flag=True, help="Bright granules inside nuclei (like video 02).")
@click.option("--density", default=0.35, show_default=True, help="Fraction of area covered.")
@click.option(
    "--texture",
    default=0.0,
    show_default=True,
    help="Structured background, peak as a share of the nucleus brightness (e.g. 0.3).",
)
@click.option(
    "--debris",
    default=0.0,
    show_default=True,
    help="Bright unlabelled debris particles per nucleus (e.g. 0.5).",
)
@click.option(
    "--dim-fraction", default=0.0, show_default=True, help="Share of dim nuclei (e.g. 0.3)."
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--ngff",
    "ngff_version",
    type=click.Choice(list(NGFF_VERSIONS)),
    default=NGFF_VERSION,
    show_default=True,
    help="The store's NGFF version (0.5: zarr v3).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@user_errors
def simulate(
    output: Path,
    frames: int,
    shape: str,
    depth: int | None,
    z_scale: float | None,
    diameter: float,
    granules: bool,
    density: float,
    texture: float,
    debris: float,
    dim_fraction: float,
    seed: int,
    ngff_version: str,
    overwrite: bool,
) -> None:
    """Simulate a nuclei time-lapse with ground-truth labels (NGFF labels 'ground_truth')."""
    from cellulus_scale.simulation.simulate import SimulationSpec
    from cellulus_scale.simulation.store import write_simulation

    size = _shape(shape)
    spec = SimulationSpec(
        frames=frames,
        shape=(depth, *size) if depth is not None else size,
        diameter=diameter,
        granules=granules,
        seed=seed,
        density=density,
        texture=texture,
        debris=debris,
        dim_fraction=dim_fraction,
        z_scale=1.0 if z_scale is None else z_scale,
    )
    path = write_simulation(output, spec, overwrite=overwrite, ngff_version=ngff_version)
    click.echo(f"wrote {path} ({frames} frames of {'x'.join(map(str, spec.shape))})")


@main.command(
    epilog="\b\nExample:\n  cellulus-scale train demo.zarr model.pt --preset cpu --max-minutes 5"
)
@click.argument("image", type=STORE)
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--preset",
    type=click.Choice(["auto", "paper", "cpu"]),
    default="auto",
    show_default=True,
    help="paper: the paper's settings; cpu: a smaller model that learns in minutes on a CPU;"
    " auto: paper where a GPU trains, cpu elsewhere.",
)
@training_options
@click.option(
    "--damping",
    type=click.Choice(["seed", "reference"]),
    default=None,
    help="seed: 1/(1+exp(-x/tau)); reference: 1-exp(-x/tau).",
)
@click.option("--elastic", is_flag=True, default=None, help="Elastic augmentation.")
@click.option(
    "--crop-depth",
    type=int,
    default=None,
    help="3D: planes per crop (default: the in-plane side's physical extent, at most the stack).",
)
@click.option("--voxel-size", type=VoxelSize(), default=None, help=VOXEL_SIZE_HELP)
@user_errors
def train(image: Path, model: Path, **options: Any) -> None:
    """Self-supervised OCE training on random crops of IMAGE; writes MODEL (.pt), a CSV loss
    log and a PNG loss plot beside it.

    An epoch is enough crops to cover every pixel of the data once (at least 400 crops for
    the paper preset, 160 for cpu).
    """
    from cellulus_scale.training.oce import train as run_training

    _report_training(run_training(image, model, **given(options)))


@main.command(
    "train-supervised",
    epilog="\b\nExample:\n  cellulus-scale train-supervised out.zarr model_sd.pt --labels cellulus"
    " --preset cpu",
)
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--labels",
    default=None,
    help="Label image of IMAGE to learn from (labels/NAME), e.g. cellulus or ground_truth.",
)
@click.option(
    "--preset",
    type=click.Choice(["auto", "paper", "cpu"]),
    default="auto",
    show_default=True,
    help="paper: Appendix B (depth 3, 64 maps, Adam 1e-5, 200 epochs); cpu: small and fast"
    " (depth 2 on a grid of 2 in 2D);"
    " auto: paper where a GPU trains, cpu elsewhere.",
)
@training_options
@click.option("--n-rays", type=int, default=None, help="Radial directions (32 in 2D, 96 in 3D).")
@click.option(
    "--grid",
    type=click.IntRange(min=1),
    default=None,
    help="Predict every g-th pixel of a 2D image (StarDist's grid; preset default).",
)
@user_errors
def train_supervised(image: Path, model: Path, **options: Any) -> None:
    """Supervised refinement (Appendix B): train a StarDist model on IMAGE and its label
    image --labels NAME, typically Cellulus' own output (OUT.zarr of 'predict' holds the image
    and labels/cellulus); writes MODEL (.pt), a CSV loss log and a plot. Then segment with
    'cellulus-scale predict IMAGE REFINED.zarr --model MODEL --diameter D'.
    """
    from cellulus_scale.training.stardist import train_supervised as run_training

    _report_training(run_training(image, model, **given(options)))


@main.command(
    epilog="\b\nExamples:\n  cellulus-scale predict video.zarr segmented.zarr\n"
    "  cellulus-scale predict video.zarr segmented.zarr --model model.pt --diameter 24\n"
    "  cellulus-scale predict video.zarr --into-input"
)
@click.argument("image", type=STORE)
@click.argument("output", type=STORE, required=False)
@click.option(
    "--model",
    "model",
    type=STORE,
    default=None,
    help="Checkpoint from 'train' or 'train-supervised'; without it a model is trained on IMAGE"
    " first and kept as OUTPUT/model.pt.",
)
@click.option(
    "--diameter",
    type=float,
    default=None,
    help="Typical object diameter in pixels, or in --diameter-unit (default: estimated from"
    " the image).",
)
@click.option(
    "--diameter-unit",
    default=None,
    help="The unit of --diameter, an NGFF space unit such as micrometer: converted with the"
    " image's x pixel size (its NGFF scale, or --voxel-size taken in this unit).",
)
@click.option(
    "--train-minutes",
    type=float,
    default=None,
    help="Without --model: the training's time budget (default: 10 on a CPU, the preset's"
    " schedule on a GPU).",
)
@click.option(
    "--preset",
    type=click.Choice(["auto", "paper", "cpu"]),
    default="auto",
    show_default=True,
    help="Without --model: the training preset (auto: paper on a GPU, cpu elsewhere).",
)
@click.option(
    "--train-epochs",
    type=int,
    default=None,
    help="Without --model: train this many epochs (default: the preset's).",
)
@click.option(
    "--method",
    type=click.Choice(["cellulus", "watershed"]),
    default="cellulus",
    show_default=True,
    help="watershed: the classical baseline, same machinery.",
)
@click.option(
    "--block-size",
    type=BlockSize(),
    default=None,
    help="Block side (256 in 2D, 64 in 3D), or one per axis, e.g. 16,128,128 for Z,Y,X (thin"
    " blocks for stacks with few, widely spaced planes).",
)
@click.option(
    "--tta",
    type=int,
    default=default_of(SegmentationConfig, "tta_passes"),
    show_default=True,
    help="Test-time noise passes (the paper's code used 32).",
)
@click.option(
    "--mode",
    type=click.Choice(["cell", "nucleus", "none"]),
    default=default_of(SegmentationConfig, "mode"),
    show_default=True,
    help="Post-processing: nucleus keeps, in each object, the pixels above its intensity "
    "threshold (StarDist polygons grown by d/4 first); cell grows and erodes Cellulus' objects; "
    "none keeps them (and StarDist polygons) as found.",
)
@click.option(
    "--nucleus-threshold",
    type=click.Choice(list(get_args(NucleusThreshold))),
    default=default_of(SegmentationConfig, "nucleus_threshold"),
    show_default=True,
    help="--mode nucleus: the threshold of each object's intensities: Otsu's, Otsu's of their"
    " logarithm, or Li's minimum cross-entropy (keeps dim, blurred rims); auto: Otsu in 2D, Li"
    " in 3D.",
)
@click.option("--threshold", type=float, default=None, help="Foreground std threshold (Otsu).")
@click.option(
    "--std-threshold",
    type=click.Choice(list(get_args(StdThreshold))),
    default=default_of(SegmentationConfig, "std_threshold"),
    show_default=True,
    help="The foreground rule without --threshold: Otsu's threshold of the embeddings' std over"
    " the video, or of its logarithm (for a small foreground); auto: Otsu in 2D, log-Otsu in 3D.",
)
@click.option(
    "--min-contrast",
    type=OptionalFloat(),
    default=default_of(SegmentationConfig, "min_contrast"),
    show_default=True,
    help="Keep objects whose mean intensity stands this many standard deviations above their"
    " surroundings; 'off' keeps every object.",
)
@click.option(
    "--clustering",
    type=click.Choice(["meanshift", "sklearn"]),
    default=default_of(SegmentationConfig, "clustering"),
    show_default=True,
    help="sklearn: scikit-learn's MeanShift, the reference.",
)
@click.option("--scheduler", default=None, help="Address of a Dask scheduler (tcp:// or tls://).")
@click.option(
    "--scheduler-file",
    type=click.Path(path_type=Path),
    default=None,
    help="The file 'dask scheduler --scheduler-file' wrote (HPC clusters), instead of --scheduler.",
)
@click.option(
    "--tls-ca-file",
    type=click.Path(path_type=Path),
    default=None,
    help="tls:// schedulers: PEM certificate of the authority that signed the cluster's.",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path),
    default=None,
    help="tls://: this client's PEM certificate.",
)
@click.option(
    "--tls-key", type=click.Path(path_type=Path), default=None, help="tls://: its PEM private key."
)
@click.option(
    "--slurm",
    type=click.Path(path_type=Path),
    default=None,
    help="Run on SLURM jobs described by this YAML file (GPU and CPU jobs; see"
    " 'cellulus-scale slurm-script'), submitted now and cancelled at the end.",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Local CPU workers (default: one per core, less four per GPU; each GPU gets four more"
    " worker that runs the network).",
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option(
    "--precision",
    type=click.Choice(list(PRECISIONS)),
    default=default_of(SegmentationConfig, "precision"),
    show_default=True,
    help="The network's arithmetic on a GPU: float32 gives the same result for any block size;"
    " tf32 and bfloat16 are faster.",
)
@click.option("--axes", default=None, help="Axis names of a plain zarr array, e.g. tyx.")
@click.option("--seed", default=0, show_default=True)
@stardist_options()
@click.option("--voxel-size", type=VoxelSize(), default=None, help=VOXEL_SIZE_HELP)
@click.option("--save-embeddings", is_flag=True, help="Keep offsets and std as an NGFF image.")
@click.option(
    "--link",
    is_flag=True,
    help="Also link the objects over time: labels/tracks (one ID per nucleus through time,"
    " divisions as parent links) and OUTPUT/tracks.geff, as 'link' does.",
)
@click.option(
    "--max-gap",
    type=int,
    default=default_of(TrackingConfig, "max_gap"),
    show_default=True,
    help="With --link: frames an object may be missing and keep its track.",
)
@click.option(
    "--max-distance",
    type=float,
    default=None,
    help="With --link: largest move between frames, in in-plane pixels (z moves count with the "
    "voxel size; default: the median object's diameter).",
)
@click.option(
    "--into-input",
    is_flag=True,
    help="Write the labels into IMAGE's own labels group (IMAGE/labels/cellulus) and"
    " copy nothing; no OUTPUT then. Nothing else of IMAGE is written to.",
)
@click.option(
    "--ngff",
    "ngff_version",
    type=click.Choice(list(NGFF_VERSIONS)),
    default=None,
    help=f"OUTPUT's NGFF version: {NGFF_VERSION} (zarr v2, read by every viewer; the default)"
    " or 0.5 (zarr v3, one shard per block and frame). With --into-input, IMAGE's own.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--resume", is_flag=True, help="Finish an interrupted run into OUTPUT.")
@user_errors
def predict(image: Path, output: Path | None, model: Path | None, **options: Any) -> None:
    """Segment every frame of IMAGE blockwise on Dask; write OUTPUT (.zarr) with a copy of the
    image and the labels 'labels/cellulus' (or, with --into-input, the labels into IMAGE).
    Without --model, train on IMAGE first; without --diameter, estimate it.
    """
    from cellulus_scale import predict as run_prediction

    result = run_prediction(image, output, model, **options)
    total = sum(result.seconds.values())
    redone = ", ".join(
        f"{stage} {count}/{result.blocks}" for stage, count in result.recomputed.items()
    )
    click.echo(
        f"wrote {result.output}: {result.objects} objects, {result.blocks} blocks per stage"
        f" (computed: {redone}), {total:.1f} s"
    )
    if result.tracks is not None:
        _report_tracks(result.output, result.tracks)


def _report_tracks(store: Path, tracks: dict[str, Any]) -> None:
    click.echo(
        f"tracks: {tracks['tracks']} in labels/tracks ({tracks['full_length_tracks']} span every"
        f" frame), {tracks['divisions']} divisions, {tracks['gaps_closed']} gaps closed;"
        f" graph {store / 'tracks.geff'}"
    )


@main.command(epilog="\b\nExample:\n  cellulus-scale link segmented.zarr --max-gap 2")
@click.argument("store", type=STORE)
@click.option(
    "--labels",
    default="cellulus",
    show_default=True,
    help="The per-frame instance labels to link (labels/NAME of STORE).",
)
@click.option(
    "--max-gap",
    type=int,
    default=default_of(TrackingConfig, "max_gap"),
    show_default=True,
    help="Frames an object may be missing and keep its track.",
)
@click.option(
    "--max-distance",
    type=float,
    default=None,
    help="Largest move between frames, in in-plane pixels (z moves count with the voxel size; "
    "default: the median object's diameter).",
)
@click.option(
    "--block-size", type=int, default=None, help="Block side (default: the labels' chunks)."
)
@click.option("--scheduler", default=None, help="Address of a Dask scheduler (tcp:// or tls://).")
@click.option("--workers", type=int, default=None, help="Local workers (default: one per core).")
@click.option("--overwrite", is_flag=True, help="Replace existing labels/tracks.")
@click.option("--resume", is_flag=True, help="Finish an interrupted link run.")
@user_errors
def link(store: Path, **options: Any) -> None:
    """Link the objects of STORE's labels over time: writes labels/tracks (one ID per nucleus
    through time; a division ends the mother's ID and starts two daughters), its track table
    (ID, first frame, last frame, parent) in its metadata, and the GEFF graph
    STORE/tracks.geff.
    """
    from cellulus_scale.workflows.link import link as run_link

    result = run_link(store, **options)
    click.echo(
        f"linked {result.summary['objects']} objects of {result.frames} frames"
        f" in {result.seconds:.1f} s"
    )
    _report_tracks(result.store, result.summary)


@main.command(
    epilog="\b\nExamples:\n  cellulus-scale refine segmented.zarr\n"
    "  cellulus-scale refine segmented.zarr --train-minutes 30 --workers 2"
)
@click.argument("output", type=STORE)
@click.option(
    "--preset",
    type=click.Choice(["auto", "paper", "cpu"]),
    default="auto",
    show_default=True,
    help="The supervised model's settings: paper (Appendix B) where a GPU trains, cpu elsewhere.",
)
@click.option(
    "--train-minutes",
    type=float,
    default=None,
    help=f"Training budget (default: {SELF_TRAINING_CPU_MINUTES:g} on a CPU, the whole schedule"
    " on a GPU).",
)
@click.option("--epochs", type=int, default=None, help="Override the preset's epoch count.")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--seed", default=0, show_default=True)
@click.option("--scheduler", default=None, help="Address of a Dask scheduler (tcp:// or tls://).")
@click.option("--workers", type=int, default=None, help="Local workers (default: one per core).")
@stardist_options(REFINE_PROB_THRESHOLD)
@click.option("--overwrite", is_flag=True, help="Replace existing labels/refined.")
@click.option("--resume", is_flag=True, help="Finish an interrupted refinement.")
@user_errors
def refine(output: Path, **options: Any) -> None:
    """Supervised refinement (Appendix B) of a finished 'predict' OUTPUT: train a StarDist model
    on its own labels/cellulus (objects of unusual size or shape left out of the loss), then
    segment its image again into labels/refined beside them; the model is kept as
    OUTPUT/refined.pt.
    """
    from cellulus_scale import refine as run_refine

    result = run_refine(output, **options)
    if result.training is not None:
        _report_training(result.training)
    else:
        click.echo(f"reused the finished model {result.model}")
    click.echo(
        f"wrote {result.prediction.output}/labels/refined: {result.prediction.objects} objects"
        f" ({sum(result.prediction.seconds.values()):.1f} s)"
    )


@main.command(
    "export-ctc",
    epilog="\b\nExample:\n  cellulus-scale export-ctc segmented.zarr segmented_RES",
)
@click.argument("store", type=STORE)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--labels", default="tracks", show_default=True, help="Linked labels to export.")
@click.option("--overwrite", is_flag=True, help="Write into a folder that is not empty.")
@user_errors
def export_ctc(store: Path, folder: Path, labels: str, overwrite: bool) -> None:
    """Write linked labels in the Cell Tracking Challenge format: FOLDER/maskTTT.tif per frame
    and FOLDER/res_track.txt (ID, first frame, last frame, parent).
    """
    from cellulus_scale.tracking.export import export_ctc as run_export

    done = run_export(store, folder, labels, overwrite)
    click.echo(
        f"wrote {done.folder}: {done.frames} masks, {done.tracks} tracks in res_track.txt"
        f" ({done.split} split at a gap)"
    )


@main.command(
    epilog="\b\nExample:\n  cellulus-scale evaluate segmented.zarr --truth demo.zarr"
    " --json scores.json"
)
@click.argument("prediction", type=STORE)
@click.option(
    "--truth",
    type=STORE,
    default=None,
    help="Store holding the ground truth (default: PREDICTION itself).",
)
@click.option(
    "--pred-labels",
    default=None,
    help="Predicted labels (default: cellulus; with --tracks: tracks).",
)
@click.option("--truth-labels", default="ground_truth", show_default=True)
@click.option(
    "--tracks",
    is_flag=True,
    help="Score tracks instead: the CTC's TRA, DET and LNK and the division F1.",
)
@click.option(
    "--frame-buffer",
    type=int,
    default=0,
    show_default=True,
    help="With --tracks: also the division F1 allowing divisions this many frames off.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None)
@user_errors
def evaluate(
    prediction: Path,
    truth: Path | None,
    pred_labels: str | None,
    truth_labels: str,
    tracks: bool,
    frame_buffer: int,
    json_path: Path | None,
    csv_path: Path | None,
) -> None:
    """Score instance labels against ground truth: F1 at IoU 0.5, SEG, AP 0.5:0.95, per frame;
    or, with --tracks, the tracks (TRA, DET, LNK, division F1).
    """
    if tracks:
        from cellulus_scale.evaluation.tracks import evaluate_tracks

        if csv_path:
            raise UserInputError("--csv is for segmentation scores", "use --json with --tracks")
        track_report = evaluate_tracks(
            prediction, truth, pred_labels or "tracks", truth_labels, frame_buffer
        )
        click.echo(track_report.table())
        if json_path:
            track_report.to_json(json_path)
        return
    from cellulus_scale.evaluation.evaluate import evaluate as run_evaluation

    report = run_evaluation(prediction, truth, pred_labels or "cellulus", truth_labels)
    click.echo(report.table())
    if json_path:
        report.to_json(json_path)
    if csv_path:
        report.to_csv(csv_path)


@main.command(
    epilog="\b\nExample:\n  cellulus-scale preview segmented.zarr --frame 0 -o preview.png"
)
@click.argument("store", type=STORE)
@click.option("--frame", type=int, default=0, show_default=True)
@click.option("--labels", default="cellulus", show_default=True)
@click.option(
    "--truth",
    type=STORE,
    default=None,
    help="A store with labels/ground_truth to show beside (default: STORE's own, if any).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("preview.png"),
    show_default=True,
)
@user_errors
def preview(store: Path, frame: int, labels: str, truth: Path | None, output: Path) -> None:
    """Draw one frame with instance outlines in distinct colours to a PNG, and the ground truth
    beside it where there is one."""
    from cellulus_scale.viz.snapshot import preview_frame

    click.echo(f"wrote {preview_frame(store, frame, output, labels, truth=truth)}")


@main.command(
    epilog="\b\nExample:\n  cellulus-scale export segmented.zarr masks/   # mask000.tif ...,"
    " measurements.csv"
)
@click.argument("store", type=STORE)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--labels", default="cellulus", show_default=True, help="Label image to export.")
@click.option("--masks/--no-masks", default=True, help="One TIFF per frame (mask000.tif, ...).")
@click.option(
    "--measurements/--no-measurements",
    default=True,
    help="measurements.csv: frame, label, centroid, area, mean intensity per channel.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing export in FOLDER.")
@user_errors
def export(store: Path, folder: Path, **options: Any) -> None:
    """Export the labels of STORE as one TIFF per frame (as Cellpose, StarDist and the Cell
    Tracking Challenge use them) and a CSV of per-object measurements, into FOLDER.
    """
    from cellulus_scale.workflows.export import export as run_export

    result = run_export(store, folder, **options)
    what = []
    if result.masks:
        what.append(f"{len(result.masks)} masks ({result.masks[0].name} ...)")
    if result.measurements is not None:
        what.append(f"{result.measurements.name} ({result.objects} rows)")
    click.echo(f"wrote {' and '.join(what)} to {result.folder}")


@main.command(
    "slurm-script", epilog="\b\nExample:\n  cellulus-scale slurm-script cluster.yaml > review.txt"
)
@click.argument("config", type=click.Path(path_type=Path))
@user_errors
def slurm_script(config: Path) -> None:
    """Print the sbatch scripts of the GPU and CPU jobs that 'predict --slurm CONFIG' submits,
    for review; nothing is submitted.
    """
    from cellulus_scale.workflows.cluster import slurm_job_scripts

    for kind, (jobs, script) in slurm_job_scripts(config).items():
        click.echo(f"# --- {kind} jobs: {jobs} x sbatch of this script ---")
        click.echo(script)


@main.command(epilog="\b\nExample:\n  cellulus-scale demo demo_output --minutes 2")
@click.argument("directory", type=click.Path(path_type=Path), default=Path("demo_output"))
@click.option("--frames", default=6, show_default=True)
@click.option("--size", default=256, show_default=True, help="Frame side in pixels.")
@click.option(
    "--minutes",
    default=30.0,
    show_default=True,
    help="Safety limit on the training (it runs the preset's epochs, the same on every machine).",
)
@click.option("--seed", default=0, show_default=True)
@user_errors
def demo(directory: Path, frames: int, size: int, minutes: float, seed: int) -> None:
    """Simulate a video, then 'cellulus-scale predict VIDEO OUT' with nothing else given (train
    on it, estimate the diameter, predict), then evaluate: the real pipeline end to end."""
    from cellulus_scale.workflows.demo import run_demo

    run_demo(directory, frames=frames, size=size, minutes=minutes, seed=seed, echo=click.echo)


if __name__ == "__main__":
    main()
