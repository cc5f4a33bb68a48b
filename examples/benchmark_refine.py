"""Refinement benchmark: does the supervised model beat the Cellulus labels it learns from?

On a real annotated store (``--real``, e.g. ``../shared/data/bbbc039-dev.zarr``; ``--fields N``
evenly spaced fields of it): the teacher (a Cellulus model, ``--teacher-model`` or trained here
with the default ``train`` within ``--teacher-minutes``) segments the fields; then StarDist
students are trained on its labels (``labels/cellulus``) with the settings of each row, each
within ``--minutes`` of training, and segment the same fields. Every row is scored against the
ground truth (F1 at IoU 0.5, SEG, AP 0.5:0.95). The rows separate the candidate causes of a
student worse than its teacher: model size, training length, the pseudo-labels' own errors
(hygiene on or off; a student trained on the ground truth as the bound), the probability
threshold. The last row is ``refine`` itself, with its defaults.

Example (the README's "Supervised refinement" table):
    python examples/benchmark_refine.py --real ../shared/data/bbbc039-dev.zarr --fields 16 \\
        --diameter 28
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from real_data import sample_fields

from cellulus_scale.config import REFINE_HYGIENE
from cellulus_scale.evaluation.evaluate import evaluate
from cellulus_scale.training.oce import train
from cellulus_scale.training.stardist import train_supervised
from cellulus_scale.workflows.predict import predict
from cellulus_scale.workflows.refine import refine

HYGIENE = dict(REFINE_HYGIENE)
#: The network of the cpu preset before StarDist's grid: depth 3, every pixel, 156 px crops.
EVERY_PIXEL = {"depth": 3, "grid": 1, "crop_size": 156}
#: row name -> (train_supervised settings on the cpu preset, predict settings, train on the
#: ground truth)
STUDENTS = {
    "old cpu preset (8 maps, 10 epochs), every object": (
        {**EVERY_PIXEL, "epochs": 10, "feature_maps": 8},
        {},
        False,
    ),
    "old cpu preset (8 maps, 10 epochs), hygiene": (
        {**EVERY_PIXEL, "epochs": 10, "feature_maps": 8, **HYGIENE},
        {},
        False,
    ),
    "16 maps, 10 epochs, hygiene": (
        {**EVERY_PIXEL, "epochs": 10, "feature_maps": 16, **HYGIENE},
        {},
        False,
    ),
    "16 maps, budget, every object": (
        {**EVERY_PIXEL, "epochs": 200, "feature_maps": 16},
        {},
        False,
    ),
    "16 maps, budget, hygiene": (
        {**EVERY_PIXEL, "epochs": 200, "feature_maps": 16, **HYGIENE},
        {},
        False,
    ),
    "16 maps, budget, hygiene, prob 0.6": (
        {**EVERY_PIXEL, "epochs": 200, "feature_maps": 16, **HYGIENE},
        {"prob_threshold": 0.6},
        False,
    ),
    "32 maps, depth 3, every pixel, budget, hygiene (the previous cpu preset)": (
        {**EVERY_PIXEL, "epochs": 200, "feature_maps": 32, **HYGIENE},
        {},
        False,
    ),
    "32 maps, depth 2 on a grid of 2, budget, hygiene (the cpu preset)": (
        {"epochs": 200, **HYGIENE},
        {},
        False,
    ),
    "16 maps, budget, ground truth (bound)": (
        {**EVERY_PIXEL, "epochs": 200, "feature_maps": 16},
        {},
        True,
    ),
}

HEADER = (
    "| row | F1 | SEG | AP | objects | training steps | training s |\n"
    "| --- | --- | --- | --- | --- | --- | --- |"
)


def line(name: str, output: Path, truth: Path, labels: str, steps, seconds) -> str:
    overall = evaluate(output, truth, pred_labels=labels).overall
    return (
        f"| {name} | {overall.f1:.3f} | {overall.seg:.3f} | {overall.ap:.3f} | {overall.n_pred}"
        f" | {steps} | {seconds} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, required=True, help="a store with ground truth")
    parser.add_argument("--fields", type=int, default=16, help="evenly spaced fields to use")
    parser.add_argument("--diameter", type=float, default=28.0)
    parser.add_argument("--teacher-model", type=Path, default=None, help="a Cellulus model")
    parser.add_argument("--teacher-minutes", type=float, default=10.0)
    parser.add_argument("--minutes", type=float, default=10.0, help="each student's budget")
    parser.add_argument("--only", default=None, help="comma-separated row numbers (1-based)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = list(STUDENTS.items())
    if args.only:
        rows = [rows[int(i) - 1] for i in args.only.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        video = sample_fields(args.real.resolve(), args.fields, work)
        model = args.teacher_model
        if model is None:
            model = work / "teacher.pt"
            train(video, model, max_minutes=args.teacher_minutes, seed=args.seed, progress=False)
        teacher = work / "teacher.zarr"
        predict(video, teacher, model, diameter=args.diameter, seed=args.seed, progress=False)
        print(f"\n{video.stem}: {args.fields} fields, diameter {args.diameter:g}\n\n{HEADER}")
        print(line("teacher: Cellulus", teacher, video, "cellulus", "-", "-"), flush=True)
        for name, (settings, predict_settings, on_truth) in rows:
            student = work / "student.pt"
            start = time.perf_counter()
            trained = train_supervised(
                video if on_truth else teacher,
                student,
                labels="ground_truth" if on_truth else "cellulus",
                preset="cpu",
                max_minutes=args.minutes,
                seed=args.seed,
                progress=False,
                overwrite=True,
                **settings,
            )
            seconds = f"{time.perf_counter() - start:.0f}"
            out = work / "student.zarr"
            predict(video, out, student, diameter=args.diameter, progress=False, **predict_settings)
            print(line(name, out, video, "cellulus", trained.steps, seconds), flush=True)
            shutil.rmtree(out)
        done = refine(teacher, seed=args.seed, train_minutes=args.minutes, progress=False)
        steps = done.training.steps if done.training else "-"
        seconds = f"{done.training.seconds:.0f}" if done.training else "-"
        print(line("refine (defaults)", teacher, video, "refined", steps, seconds), flush=True)


if __name__ == "__main__":
    main()
