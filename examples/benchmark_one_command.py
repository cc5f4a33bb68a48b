"""The one command against the explicit one, at object sizes from 8 to 160 pixels.

For a real annotated store (``--real``, e.g. ``../shared/data/bbbc039-dev.zarr``, ``--fields``
of it) and for simulated videos of each ``--diameters``: the diameter estimate against the
truth's median equivalent diameter, then ``predict VIDEO OUT`` with nothing else given (it
trains on the video and estimates the diameter), then ``predict VIDEO OUT --model OUT/model.pt
--diameter TRUE`` (the same model, the true diameter); F1, SEG and seconds of both.

Examples:
    python examples/benchmark_one_command.py --diameters 8,12,24,48,96,160
    python examples/benchmark_one_command.py --real ../shared/data/bbbc039-dev.zarr --fields 10 \\
        --diameters ""
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from real_data import sample_fields

from cellulus_scale.evaluation.evaluate import evaluate
from cellulus_scale.io import ome_zarr
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.workflows.diameter import estimate_diameter
from cellulus_scale.workflows.predict import predict


def true_diameter(video: Path) -> float:
    """The median equivalent diameter of the ground-truth objects (in-plane pixels)."""
    labels = ome_zarr.open_labels(video, "ground_truth")
    sizes = []
    for frame in labels.canonical():
        values = np.asarray(frame).ravel()
        counts = np.bincount(values[values > 0].astype(np.int64))
        sizes.append(counts[counts > 0])
    areas = np.concatenate(sizes).astype(float)
    return float(np.median(2 * np.sqrt(areas / np.pi)))


def row(name: str, video: Path, folder: Path, seed: int, minutes: float | None) -> None:
    truth = true_diameter(video)
    estimate = estimate_diameter(video).diameter
    literal = folder / f"{name}-literal.zarr"
    start = time.perf_counter()
    predict(video, literal, seed=seed, progress=False, overwrite=True, train_minutes=minutes)
    literal_s = time.perf_counter() - start
    scores = evaluate(literal, video).overall
    explicit = folder / f"{name}-explicit.zarr"
    start = time.perf_counter()
    predict(video, explicit, literal / "model.pt", truth, seed=seed, progress=False, overwrite=True)
    explicit_s = time.perf_counter() - start
    given = evaluate(explicit, video).overall
    print(
        f"| {name} | {truth:.1f} | {estimate:.1f} | {100 * (estimate / truth - 1):+.0f}% |"
        f" {scores.f1:.3f} | {scores.seg:.3f} | {literal_s:.0f} | {given.f1:.3f} |"
        f" {given.seg:.3f} | {explicit_s:.0f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", default=None, help="an OME-Zarr image with ground truth")
    parser.add_argument("--fields", type=int, default=None, help="of --real, evenly spaced")
    parser.add_argument("--diameters", default="12,24,48,96", help="simulated nucleus sizes")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-minutes", type=float, default=None, help="the training budget (default: predict's)"
    )
    args = parser.parse_args()
    print(
        "| data | true diameter | estimate | error | F1, literal | SEG, literal | s |"
        " F1, explicit | SEG, explicit | s |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
        " --- | --- |"
    )
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if args.real:
            video = Path(args.real).resolve()
            if args.fields:
                video = sample_fields(video, args.fields, folder)
            row(video.stem, video, folder, args.seed, args.train_minutes)
        for diameter in [float(d) for d in args.diameters.split(",") if d]:
            side = int(min(1024, max(192, 10 * diameter)))
            spec = SimulationSpec(
                frames=args.frames, shape=(side, side), diameter=diameter, seed=args.seed + 3
            )
            video = write_simulation(folder / f"d{diameter:g}.zarr", spec)
            row(
                f"simulated, d {diameter:g} ({side}x{side})",
                video,
                folder,
                args.seed,
                args.train_minutes,
            )


if __name__ == "__main__":
    main()
