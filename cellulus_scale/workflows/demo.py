"""The end-to-end demo: simulate a video, then the one command (train on it, estimate the
diameter, predict), then evaluate, through the real pipeline."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from cellulus_scale.evaluation.evaluate import EvaluationReport, evaluate
from cellulus_scale.io.ome_zarr import run_status
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.viz.snapshot import preview_frame
from cellulus_scale.workflows.predict import predict


def run_demo(
    directory: str | os.PathLike[str],
    frames: int = 6,
    size: int = 256,
    minutes: float = 30.0,
    seed: int = 0,
    diameter: float = 24.0,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> EvaluationReport:
    """Simulate a small video in ``directory``, run ``predict`` on it with nothing else given
    (it trains the preset on the video itself for the preset's epochs, ``minutes`` being only
    a safety limit, and estimates the diameter), and print and return the scores against the
    ground truth. The same figures on every machine that trains within ``minutes``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    video = directory / "simulated.zarr"
    output = directory / "segmented.zarr"
    start = time.perf_counter()
    echo(f"1/3 simulating {frames} frames of {size}x{size} (nuclei of {diameter:g} px) -> {video}")
    write_simulation(
        video,
        SimulationSpec(frames=frames, shape=(size, size), diameter=diameter, seed=seed),
        overwrite=True,
    )
    echo(f"2/3 cellulus-scale predict {video} {output}")
    result = predict(
        video,
        output,
        block_size=128,
        train_minutes=minutes,
        overwrite=True,
        seed=seed,
        progress=progress,
    )
    echo(f"    {result.objects} objects")
    echo("3/3 evaluating against the simulator's ground truth")
    report = evaluate(output, video)
    echo(report.table())
    overall = report.overall
    estimated = float(run_status(output)["diameter"])
    seconds = time.perf_counter() - start
    echo(
        f"F1 {overall.f1:.3f}  SEG {overall.seg:.3f}  AP {overall.ap:.3f}  diameter estimated"
        f" {estimated:.1f} px (simulated {diameter:g})  ({seconds:.0f} s in all)"
    )
    picture = preview_frame(output, 0, directory / "preview.png", truth=video)
    echo(f"preview of frame 0 beside the ground truth: {picture}")
    return report
