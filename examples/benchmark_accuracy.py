"""Accuracy benchmark: real annotated images first, then simulated videos.

Real rows (``--real STORE``, an OME-Zarr image with ``labels/ground_truth``, e.g. the 50 fields
of ``../shared/data/bbbc039-dev.zarr``): Cellulus with the default commands (``train``, then
``predict --diameter D``), Cellulus with other settings (``--variant``, e.g. more test-time
passes), and the watershed baseline, all scored on every object (border objects included).
``--epochs-list`` adds accuracy against training length; ``--refine`` adds, under each
Cellulus row, the supervised refinement of that run (``refine``: a StarDist model trained on
its labels, scored as ``labels/refined``). Simulated rows (``--simulated``): the
paper's two SIMULATED-like videos and the failure cases of real fields (sparse, textured
background, debris, dim nuclei), each trained on itself.

Every row prints F1 at IoU 0.5, SEG, AP 0.5:0.95, the foreground pixel IoU against the truth's,
the objects found on true background (speckles), the training steps and seconds, and the
prediction seconds.

Examples:
    python examples/benchmark_accuracy.py --real ../shared/data/bbbc039-dev.zarr --diameter 28
    python examples/benchmark_accuracy.py --simulated --frames 4 --shape 384,384
    python examples/benchmark_accuracy.py --real ../shared/data/bbbc039-dev.zarr --refine
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from real_data import sample_fields

from cellulus_scale.evaluation.evaluate import evaluate
from cellulus_scale.evaluation.metrics import overlap_table
from cellulus_scale.io import ome_zarr
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import train
from cellulus_scale.workflows.predict import predict
from cellulus_scale.workflows.refine import refine

#: name -> simulator settings; the first two stand in for the paper's SIMULATED videos 01 and 02
SIMULATED = {
    "01-like": {},
    "02-like (granules)": {"granules": True},
    "sparse": {"density": 0.08},
    "textured background": {"texture": 0.4},
    "debris": {"debris": 0.6},
    "dim nuclei": {"dim_fraction": 0.4, "density": 0.2},
}


@dataclass
class Row:
    data: str
    method: str
    f1: float
    seg: float
    ap: float
    foreground_iou: float
    background_objects: int
    objects: int
    steps: str
    train_s: str
    predict_s: float

    def line(self) -> str:
        return (
            f"| {self.data} | {self.method} | {self.f1:.3f} | {self.seg:.3f} | {self.ap:.3f} |"
            f" {self.foreground_iou:.3f} | {self.background_objects} | {self.objects} |"
            f" {self.steps} | {self.train_s} | {self.predict_s:.0f} |"
        )


HEADER = (
    "| data | method | F1 | SEG | AP | foreground IoU | objects on background | objects |"
    " training steps | training s | predict s |\n| --- | --- | --- | --- | --- | --- | --- |"
    " --- | --- | --- | --- |"
)


def pixel_scores(output: Path, truth: Path, labels: str = "cellulus") -> tuple[float, int]:
    """Foreground pixel IoU of the labels against the truth's, and the predicted objects lying
    (at least 90%) on true background."""
    pred = zarr.open_array(str(output / "labels" / labels / "0"), mode="r")
    true = zarr.open_array(str(truth / "labels" / "ground_truth" / "0"), mode="r")
    inter = union = stray = 0
    for t in range(true.shape[0]):
        table = overlap_table(np.squeeze(true[t]), np.squeeze(pred[t]))
        shared = int(table.intersections.sum())
        inter += shared
        union += int(table.true_areas.sum() + table.pred_areas.sum()) - shared
        covered = np.bincount(table.cols, weights=table.intersections, minlength=table.n_pred)
        stray += int(np.sum(covered < 0.1 * table.pred_areas))
    return inter / max(union, 1), stray


def score(
    data: str,
    method: str,
    output: Path,
    truth: Path,
    trained,
    predict_s: float,
    labels: str = "cellulus",
) -> Row:
    overall = evaluate(output, truth, pred_labels=labels).overall
    iou, stray = pixel_scores(output, truth, labels)
    steps, seconds = trained if trained else ("-", "-")
    return Row(
        data,
        method,
        overall.f1,
        overall.seg,
        overall.ap,
        iou,
        stray,
        overall.n_pred,
        str(steps),
        seconds if isinstance(seconds, str) else f"{seconds:.0f}",
        predict_s,
    )


def timed_predict(video: Path, output: Path, model: Path | None, diameter: float, **options):
    start = time.perf_counter()
    predict(video, output, model, diameter=diameter, progress=False, overwrite=True, **options)
    return time.perf_counter() - start


def refined_row(name: str, out: Path, truth: Path, args: argparse.Namespace) -> Row:
    """``refine`` on the finished run ``out`` (its labels/refined), scored like the others; the
    training columns are the refinement's."""
    start = time.perf_counter()
    result = refine(out, seed=args.seed, train_minutes=args.refine_minutes, progress=False)
    seconds = time.perf_counter() - start
    trained_by = (result.training.steps, result.training.seconds)
    predict_s = seconds - result.training.seconds
    return score(name, "refined on it", out, truth, trained_by, predict_s, labels="refined")


def parse_variant(text: str) -> dict:
    """'tta=32,mode=cell' -> {'tta': 32, 'mode': 'cell'}."""
    options = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        options[key.replace("-", "_")] = None if value == "off" else value
    return options


def real_rows(args: argparse.Namespace, folder: Path) -> None:
    video = Path(args.real).resolve()
    if args.fields:
        video = sample_fields(video, args.fields, folder)
    name = video.stem
    frames = ome_zarr.open_image(video).canonical_shape[0]
    print(f"\n{name}: {frames} fields, diameter {args.diameter:g}, preset {args.preset}\n")
    print(HEADER)
    model = folder / "model.pt"
    start = time.perf_counter()
    trained = train(video, model, preset=args.preset, seed=args.seed, progress=False)
    trained_by = (trained.steps, time.perf_counter() - start)
    out = folder / "default.zarr"
    seconds = timed_predict(video, out, model, args.diameter, seed=args.seed)
    print(score(name, "Cellulus, default", out, video, trained_by, seconds).line(), flush=True)
    if args.refine:
        print(refined_row(name, out, video, args).line(), flush=True)
    for variant in args.variant:
        out = folder / "variant.zarr"
        options = parse_variant(variant)
        seconds = timed_predict(video, out, model, args.diameter, seed=args.seed, **options)
        row = score(name, f"Cellulus, {variant}", out, video, trained_by, seconds)
        print(row.line(), flush=True)
        shutil.rmtree(out)
    out = folder / "watershed.zarr"
    seconds = timed_predict(video, out, None, args.diameter, method="watershed")
    print(score(name, "watershed", out, video, None, seconds).line(), flush=True)
    for epochs in args.epochs_list:
        model = folder / f"model-{epochs}.pt"
        start = time.perf_counter()
        trained = train(video, model, preset=args.preset, epochs=epochs, progress=False)
        trained_by = (trained.steps, time.perf_counter() - start)
        out = folder / f"epochs-{epochs}.zarr"
        seconds = timed_predict(video, out, model, args.diameter, seed=args.seed)
        row = score(name, f"Cellulus, {epochs} epochs", out, video, trained_by, seconds)
        print(row.line(), flush=True)
        shutil.rmtree(out)


def simulated_rows(args: argparse.Namespace, folder: Path) -> None:
    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"\nsimulated: {args.frames} frames of {args.shape}, diameter 24, preset {args.preset}\n")
    print(HEADER)
    chosen = args.sets.split(",") if args.sets else list(SIMULATED)
    for name in chosen:
        settings = SIMULATED[name]
        spec = SimulationSpec(frames=args.frames, shape=shape, seed=args.seed + 11, **settings)
        video = write_simulation(folder / f"{name}.zarr", spec)
        model = folder / f"{name}.pt"
        start = time.perf_counter()
        trained = train(video, model, preset=args.preset, seed=args.seed, progress=False)
        trained_by = (trained.steps, time.perf_counter() - start)
        out = folder / f"{name}-cellulus.zarr"
        seconds = timed_predict(video, out, model, 24, seed=args.seed)
        print(score(name, "Cellulus", out, video, trained_by, seconds).line(), flush=True)
        if args.refine:
            print(refined_row(name, out, video, args).line(), flush=True)
        out = folder / f"{name}-watershed.zarr"
        seconds = timed_predict(video, out, None, 24, method="watershed")
        print(score(name, "watershed", out, video, None, seconds).line(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default=None, help="an OME-Zarr image with ground truth")
    parser.add_argument("--diameter", type=float, default=28.0, help="of the real set's nuclei")
    parser.add_argument(
        "--fields", type=int, default=None, help="train and score on this many evenly spaced fields"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="predict options of an extra real row, e.g. 'tta=32' or 'mode=cell,min_contrast=off'",
    )
    parser.add_argument(
        "--epochs-list",
        type=lambda t: [int(v) for v in t.split(",")],
        default=[],
        help="extra real rows trained for these epochs, e.g. 2,5,20",
    )
    parser.add_argument(
        "--refine",
        action="store_true",
        help="add a row for 'refine' on each Cellulus run (labels/refined beside its labels)",
    )
    parser.add_argument(
        "--refine-minutes",
        type=float,
        default=None,
        help="refine's training budget (default: refine's own)",
    )
    parser.add_argument("--simulated", action="store_true", help="the simulated rows")
    parser.add_argument(
        "--sets",
        default=None,
        help=f"comma-separated simulated sets (default: all of {', '.join(SIMULATED)})",
    )
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--shape", default="384,384")
    parser.add_argument("--preset", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.real:
            real_rows(args, Path(folder))
        if args.simulated:
            simulated_rows(args, Path(folder))


if __name__ == "__main__":
    main()
