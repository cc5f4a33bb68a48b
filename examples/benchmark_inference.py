"""Inference choices against accuracy: test-time-augmentation passes, post-processing mode and
clustering method.

Trains the cpu preset on a video (simulated, or with ``--real`` an annotated store such as
``../shared/data/bbbc039-dev.zarr``, ``--fields`` of it; ``--model`` reuses a trained model),
then predicts it
- with --tta 1, 2, 4, 8, 16, 32 and each ``--modes`` (default clustering), printing F1, SEG,
  AP and the time of the network stage; and
- with the default clustering ('meanshift', all seeds moved together) and scikit-learn's
  MeanShift (the reference), printing their scores, clustering times, and how well the two
  segmentations agree with each other (F1 at IoU 0.5 and 0.9).

Examples:
    python examples/benchmark_inference.py --frames 6 --shape 256,256 --minutes 1
    python examples/benchmark_inference.py --real ../shared/data/bbbc039-dev.zarr --fields 10 \
        --diameter 28 --modes nucleus,cell
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster
from real_data import sample_fields

from cellulus_scale.evaluation.evaluate import evaluate
from cellulus_scale.evaluation.metrics import combine, score_frame
from cellulus_scale.io.ome_zarr import open_labels
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import train
from cellulus_scale.workflows.predict import predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--shape", default="256,256")
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--passes", default="1,2,4,8,16,32")
    parser.add_argument("--modes", default="nucleus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", default=None, help="an OME-Zarr image with ground truth")
    parser.add_argument("--fields", type=int, default=None, help="of --real, evenly spaced")
    parser.add_argument("--diameter", type=float, default=24.0)
    parser.add_argument("--model", default=None, help="a trained model to use (else trained)")
    parser.add_argument("--no-clustering", action="store_true", help="skip the clustering rows")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if args.real:
            video = Path(args.real).resolve()
            if args.fields:
                video = sample_fields(video, args.fields, folder)
            what = f"{video.stem}, {open_labels(video, 'ground_truth').data.shape[0]} fields"
        else:
            video = write_simulation(
                folder / "video.zarr",
                SimulationSpec(frames=args.frames, shape=shape, seed=args.seed + 5),
            )
            what = f"{args.frames} simulated frames of {shape}"
        model = Path(args.model) if args.model else folder / "model.pt"
        if not args.model:
            train(video, model, preset="cpu", max_minutes=args.minutes, progress=False)
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        )
        with Client(cluster) as client:

            def run(name: str, **options) -> tuple[Path, dict[str, float]]:
                out = folder / f"{name}.zarr"
                result = predict(
                    video,
                    out,
                    model,
                    diameter=args.diameter,
                    overwrite=True,
                    progress=False,
                    client=client,
                    seed=args.seed,
                    **options,
                )
                return out, result.seconds

            run("warm-up", tta=1)
            trained = "given model" if args.model else f"cpu preset ({args.minutes:g} min)"
            print(f"# {what}, {trained}, diameter {args.diameter:g}, 2 workers")
            print(
                "| --tta | --mode | F1 | SEG | AP | network s |\n"
                "| --- | --- | --- | --- | --- | --- |"
            )
            for passes in (int(p) for p in args.passes.split(",")):
                for mode in args.modes.split(","):
                    out, seconds = run(f"tta{passes}", tta=passes, mode=mode)
                    scores = evaluate(out, video).overall
                    print(
                        f"| {passes} | {mode} | {scores.f1:.3f} | {scores.seg:.3f} |"
                        f" {scores.ap:.3f} | {seconds['network']:.1f} |",
                        flush=True,
                    )
            if args.no_clustering:
                cluster.close()
                return
            print("clustering  F1     SEG    AP     clustering-s  stitching-s")
            outputs = {}
            for method in ("meanshift", "sklearn"):
                out, seconds = run(method, clustering=method)
                outputs[method] = out
                scores = evaluate(out, video).overall
                print(
                    f"{method:10s}  {scores.f1:.3f}  {scores.seg:.3f}  {scores.ap:.3f}"
                    f"  {seconds['clustering']:12.2f}  {seconds['stitching']:11.2f}",
                    flush=True,
                )
            fast = open_labels(outputs["meanshift"], "cellulus").data.compute()
            reference = open_labels(outputs["sklearn"], "cellulus").data.compute()
            agreement = combine([score_frame(r, f) for r, f in zip(reference, fast, strict=True)])
            identical = float(np.mean(fast == reference))
            print(
                f"meanshift vs sklearn: F1@0.5 {agreement.f1:.3f}, AP {agreement.ap:.3f},"
                f" identical pixels {100 * identical:.2f}%"
            )
        cluster.close()


if __name__ == "__main__":
    main()
