"""Accuracy benchmark on two simulated videos shaped like the paper's SIMULATED set.

Video 01-like: plain nuclei. Video 02-like: nuclei with bright granules (over-segments
classical methods). For each: train Cellulus (cpu preset by default) for a time budget,
predict blockwise, and run the watershed baseline through the same machinery; then train the
supervised refinement (seed, Appendix B: a depth-3 StarDist model) on Cellulus' own labels for
the same budget and predict with it ("refined"); print F1 at IoU 0.5, SEG and AP for all three,
the training time and the wall times.

Example:
    python examples/benchmark_accuracy.py --frames 8 --shape 384,384 --minutes 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cellulus_scale.config import SegmentationConfig, default_of
from cellulus_scale.evaluation.evaluate import evaluate
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import train
from cellulus_scale.training.stardist import train_supervised
from cellulus_scale.workflows.predict import predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--shape", default="256,256")
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget per video")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--tta", type=int, default=default_of(SegmentationConfig, "tta_passes"))
    parser.add_argument("--epochs", type=int, default=None, help="Cellulus epochs (preset's)")
    parser.add_argument("--mode", default="nucleus", choices=["cell", "nucleus", "none"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    print(
        f"# {args.frames} frames of {shape}, preset {args.preset},"
        f" epochs {args.epochs or 'preset'}, budget {args.minutes:g} min,"
        f" tta {args.tta}, mode {args.mode}"
    )
    print("video        method     F1     SEG    AP     train-s  predict-s")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for name, granules in (("01-like", False), ("02-like", True)):
            video = write_simulation(
                folder / f"{name}.zarr",
                SimulationSpec(
                    frames=args.frames, shape=shape, granules=granules, seed=args.seed + 11
                ),
            )
            model = folder / f"{name}.pt"
            start = time.perf_counter()
            train(
                video,
                model,
                preset=args.preset,
                epochs=args.epochs,
                max_minutes=args.minutes,
                progress=False,
                seed=args.seed,
            )
            trained = {"cellulus": time.perf_counter() - start}
            for method in ("cellulus", "watershed", "refined"):
                out = folder / f"{name}-{method}.zarr"
                chosen = model if method == "cellulus" else None
                if method == "refined":  # StarDist on Cellulus' own labels, same budget
                    chosen = folder / f"{name}-refined.pt"
                    start = time.perf_counter()
                    train_supervised(
                        folder / f"{name}-cellulus.zarr",
                        chosen,
                        labels="cellulus",
                        preset=args.preset,
                        max_minutes=args.minutes,
                        progress=False,
                        seed=args.seed,
                    )
                    trained[method] = time.perf_counter() - start
                start = time.perf_counter()
                predict(
                    video,
                    out,
                    chosen,
                    diameter=24,
                    method="watershed" if method == "watershed" else "cellulus",
                    tta=args.tta,
                    mode=args.mode,
                    progress=False,
                    seed=args.seed,
                )
                seconds = time.perf_counter() - start
                scores = evaluate(out, video).overall
                train_s = f"{trained[method]:7.0f}" if method in trained else "      -"
                print(
                    f"{name:11s}  {method:9s}  {scores.f1:.3f}  {scores.seg:.3f}  "
                    f"{scores.ap:.3f}  {train_s}  {seconds:9.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
