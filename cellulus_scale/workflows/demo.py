"""The end-to-end demo: simulate, train, predict, evaluate, through the real pipeline."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from cellulus_scale.evaluation.evaluate import EvaluationReport, evaluate
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import train
from cellulus_scale.workflows.predict import predict


def run_demo(
    directory: str | os.PathLike[str],
    frames: int = 6,
    size: int = 256,
    minutes: float = 2.0,
    seed: int = 0,
    diameter: float = 24.0,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> EvaluationReport:
    """Simulate a small video in ``directory``, train the cpu preset for ``minutes``, predict
    blockwise on a local Dask cluster, and print and return the scores against ground truth."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    video = directory / "simulated.zarr"
    model = directory / "model.pt"
    output = directory / "segmented.zarr"
    start = time.perf_counter()
    echo(f"1/4 simulating {frames} frames of {size}x{size} into {video}")
    write_simulation(
        video,
        SimulationSpec(frames=frames, shape=(size, size), diameter=diameter, seed=seed),
        overwrite=True,
    )
    echo(f"2/4 training the cpu preset for up to {minutes:g} min -> {model}")
    trained = train(
        video,
        model,
        preset="cpu",
        max_minutes=minutes,
        seed=seed,
        overwrite=True,
        progress=progress,
    )
    echo(f"    {trained.steps} steps, final loss {trained.final_loss:.4f}")
    echo(f"3/4 predicting blockwise -> {output}")
    result = predict(
        video,
        output,
        model,
        diameter=diameter,
        block_size=128,
        mode="nucleus",
        overwrite=True,
        seed=seed,
        progress=progress,
    )
    echo(f"    {result.objects} objects")
    echo("4/4 evaluating against the simulator's ground truth")
    report = evaluate(output, video)
    echo(report.table())
    overall = report.overall
    echo(
        f"F1 {overall.f1:.3f}  SEG {overall.seg:.3f}  AP {overall.ap:.3f}"
        f"  ({time.perf_counter() - start:.0f} s in all)"
    )
    echo(f"Look at it: cellulus-scale preview {output} --frame 0 -o {directory / 'preview.png'}")
    return report
