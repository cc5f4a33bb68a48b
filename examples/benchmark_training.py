"""Benchmark self-supervised training: seconds per step and the share spent waiting for data.

Simulates a small video into a temporary folder, trains each preset for a few steps with the
real ``cellulus_scale.training.oce.train`` and prints, per preset, the steady-state seconds per
step (from the loss log, leaving out the first step's warm-up) and the share of the training loop
spent waiting for the next batch: over the whole loop (``TrainResult.data_wait_fraction``,
which includes starting the loader workers) and from the second step on.

    python examples/benchmark_training.py                      # paper and cpu presets
    python examples/benchmark_training.py --presets paper --steps 20 --shape 512,512
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

from cellulus_scale.config import PRESETS
from cellulus_scale.io.ome_zarr import open_image
from cellulus_scale.model.device import choose_device
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.crops import crops_per_epoch
from cellulus_scale.training.loop import loader_workers
from cellulus_scale.training.oce import train


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="256,256", help="frame size Y,X (default 256,256)")
    parser.add_argument("--frames", type=int, default=2, help="frames to simulate (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per preset")
    parser.add_argument("--presets", default="paper,cpu", help="comma-separated preset names")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers (preset default)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (torch default)"
    )
    return parser.parse_args()


def steady_state(log: Path) -> tuple[float, float]:
    """Seconds per step and the share of it spent waiting for data, from the loss log, leaving
    out the first step (model warm-up, loader start)."""
    with log.open() as handle:
        rows = list(csv.DictReader(handle))
    if len(rows) < 2:
        return math.nan, math.nan
    clock = [float(row["seconds"]) for row in rows]
    span = clock[-1] - clock[0]
    waited = sum(float(row["data_wait"]) for row in rows[1:])
    return span / (len(rows) - 1), waited / span if span > 0 else math.nan


def main() -> None:
    args = parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown preset(s) {', '.join(unknown)}; use {', '.join(PRESETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads,"
        f" {platform.processor() or platform.machine()}, device {args.device}"
    )
    with tempfile.TemporaryDirectory(prefix="cellulus-bench-") as folder:
        video = Path(folder) / "sim.zarr"
        start = time.perf_counter()
        write_simulation(video, SimulationSpec(frames=args.frames, shape=shape, diameter=24.0))
        print(
            f"simulated {args.frames} x {'x'.join(map(str, shape))} in"
            f" {time.perf_counter() - start:.1f} s"
        )
        image = open_image(video)
        header = (
            f"{'preset':<8}{'maps':>5}{'crop':>6}{'batch':>6}{'workers':>8}{'steps':>6}"
            f"{'s/step':>9}{'crops/s':>9}{'wait (all)':>11}{'wait (2-)':>10}{'total s':>9}"
        )
        print(header)
        print("-" * len(header))
        for name in presets:
            preset = PRESETS[name]
            batch = preset.train.batch_size
            crop = preset.train.crop_size
            requested = preset.train.num_workers if args.num_workers is None else args.num_workers
            workers = loader_workers(requested, choose_device(args.device))
            model = Path(folder) / f"{name}.pt"
            # One epoch of exactly --steps steps, unless covering the data once needs more.
            steps_wanted = args.steps * batch
            if crops_per_epoch(image, crop, steps_wanted) > steps_wanted:
                print(f"({name}: one pass over the data needs more than {args.steps} steps)")
            result = train(
                video,
                model,
                preset=name,
                epochs=1,
                device=args.device,
                progress=False,
                min_crops_per_epoch=steps_wanted,
                num_workers=workers,
            )
            per_step, steady_wait = steady_state(model.with_suffix(".loss.csv"))
            print(
                f"{name:<8}{preset.model.feature_maps:>5}{crop:>6}{batch:>6}{workers:>8}"
                f"{result.steps:>6}{per_step:>9.3f}{batch / per_step:>9.1f}"
                f"{100 * result.data_wait_fraction:>10.1f}%{100 * steady_wait:>9.1f}%"
                f"{result.seconds:>9.1f}"
            )


if __name__ == "__main__":
    main()
