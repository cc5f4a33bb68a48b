"""3D accuracy benchmark: a real anisotropic embryo stack and a simulated anisotropic video.

Each data set gets four rows: the one command with default settings, ``predict IN OUT`` (train
on the input itself, estimate the diameter, segment blockwise), then the model it trained and
the diameter it estimated with ``--std-threshold otsu`` (the 2D foreground rule; 3D defaults
to log-Otsu) and with ``--nucleus-threshold otsu`` (the 2D outline; 3D defaults to Li's), and
the classical watershed baseline (``--method watershed``) at that diameter; all scored
against the ground truth with :func:`cellulus_scale.evaluation.evaluate.evaluate` (F1 at IoU
0.5, SEG, AP 0.5:0.95). The voxel size comes from each store's NGFF scale.

- real: ``--real STORE`` (e.g. ``../shared/data/bbbc050-embryo8.zarr``: 51 x 120 x 122 voxels,
  z step 2.18 pixels, 8 nuclei, ``labels/ground_truth``), read in place;
- simulated: ``simulate --depth Z --z-scale S`` (``--frames``, ``--shape``, ``--depth``,
  ``--z-scale``, ``--diameter``), written to a temporary folder.

Example (the README's "3D" figures):
    python examples/benchmark_3d.py --real ../shared/data/bbbc050-embryo8.zarr \\
        --frames 4 --shape 96,96 --depth 24 --z-scale 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from cellulus_scale.evaluation.evaluate import evaluate
from cellulus_scale.io import ome_zarr
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.workflows.predict import predict

# The same model and diameter with one setting at the 2D default (the 3D default before it)
VARIANTS = {
    "std-threshold otsu": {"std_threshold": "otsu"},
    "nucleus-threshold otsu": {"nucleus_threshold": "otsu"},
}

HEADER = (
    "| data | voxel z:y:x | settings | F1 | SEG | AP | true / found | diameter px |"
    " training steps | training s | total s |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    " --- | --- | --- |"
)


def run_rows(name: str, store: Path, work: Path, options: dict) -> list[str]:
    """The one command on ``store`` with ``options``, then its model with each of
    :data:`VARIANTS` and the watershed baseline, each scored against the store's ground truth."""
    image = ome_zarr.open_image(store)
    spacing = ome_zarr.voxel_spacing(image) or (1.0, 1.0, 1.0)
    out = work / f"{name.replace(' ', '_').replace(',', '')}.zarr"
    started = time.perf_counter()
    predict(store, out, overwrite=True, progress=True, **options)
    seconds = time.perf_counter() - started
    attrs = ome_zarr.run_status(out)
    diameter = float(attrs["diameter"])
    log = (out / "model.loss.csv").read_text().strip().splitlines()
    steps = int(log[-1].split(",")[0]) if len(log) > 1 else 0
    train_s = float(log[-1].split(",")[-2]) if len(log) > 1 else 0.0
    rows = []
    runs = [(out, "defaults", seconds)]
    for label, setting in VARIANTS.items():
        variant = out.with_name(f"{out.stem}_{label.replace(' ', '_')}.zarr")
        began = time.perf_counter()
        predict(
            store,
            variant,
            out / "model.pt",
            diameter=diameter,
            overwrite=True,
            progress=False,
            workers=options["workers"],
            seed=options["seed"],
            **setting,
        )
        runs.append((variant, label, time.perf_counter() - began))
    baseline = out.with_name(f"{out.stem}_watershed.zarr")
    began = time.perf_counter()
    predict(
        store,
        baseline,
        method="watershed",
        diameter=diameter,
        overwrite=True,
        progress=False,
        workers=options["workers"],
    )
    runs.append((baseline, "watershed baseline", time.perf_counter() - began))
    for path, settings, total in runs:
        report = evaluate(path, store)
        scores = report.overall
        print(json.dumps({"data": name, "settings": settings, **report.rows()[-1]}), flush=True)
        trained = "- | -" if settings == "watershed baseline" else f"{steps} | {train_s:.0f}"
        rows.append(
            f"| {name} | {':'.join(f'{v:g}' for v in spacing)} | {settings} | {scores.f1:.3f} |"
            f" {scores.seg:.3f} | {scores.ap:.3f} | {scores.n_true} / {scores.n_pred} |"
            f" {diameter:.1f} | {trained} | {total:.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, default=None, help="A 3D store with ground truth.")
    parser.add_argument("--frames", type=int, default=4, help="Simulated frames (0: none).")
    parser.add_argument("--shape", default="96,96", help="Simulated plane size Y,X.")
    parser.add_argument("--depth", type=int, default=24, help="Simulated planes.")
    parser.add_argument("--z-scale", type=float, default=3.0, help="Simulated z step (px).")
    parser.add_argument("--diameter", type=float, default=16.0, help="Simulated diameter (px).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="Local Dask workers.")
    parser.add_argument(
        "--train-minutes", type=float, default=None, help="Training budget (default: predict's)."
    )
    parser.add_argument("--keep", type=Path, default=None, help="Keep the outputs here.")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="benchmark-3d-"))
    work.mkdir(parents=True, exist_ok=True)
    options = {"workers": args.workers, "seed": args.seed, "train_minutes": args.train_minutes}
    rows = []
    try:
        if args.real is not None:
            rows += run_rows(args.real.stem, args.real, work, options)
        if args.frames > 0:
            height, width = (int(v) for v in args.shape.split(","))
            spec = SimulationSpec(
                frames=args.frames,
                shape=(args.depth, height, width),
                diameter=args.diameter,
                seed=args.seed,
                z_scale=args.z_scale,
            )
            video = write_simulation(work / "simulated.zarr", spec, overwrite=True)
            name = (
                f"simulated {args.frames}x{args.depth}x{height}x{width}, z-scale {args.z_scale:g}"
            )
            rows += run_rows(name, video, work, options)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
