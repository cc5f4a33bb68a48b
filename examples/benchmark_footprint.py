"""Disk footprint of `predict`: the peak size of everything it writes, sampled during the run
(the image copy, the scratch it keeps between stages, the labels, the pyramids), against the
stored size of the input image, and the run's time.

    python examples/benchmark_footprint.py --input ../shared/data/bbbc039-dev.zarr --frames 8 \\
        --model model.pt --diameter 28 [--baseline-source DIR]

The first ``--frames`` frames of the input are copied (as stored: same chunks and compressor)
to a temporary folder, which is the input of every run. ``--baseline-source DIR`` also runs
the same prediction with the package found in DIR (e.g. an earlier commit:
``git archive COMMIT | tar -x -C DIR``) and prints its figures and how its labels compare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zarr

PREDICT = """
import json, sys, time
from cellulus_scale.workflows.predict import predict
def main():
    options = json.loads(sys.argv[1])
    start = time.perf_counter()
    predict(**options)
    print(json.dumps({"seconds": time.perf_counter() - start}))
if __name__ == "__main__":
    main()
"""


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we looked
                total += os.path.getsize(os.path.join(folder, name))
    return total


def subset(source: Path, frames: int, target: Path) -> Path:
    """The first ``frames`` frames of the NGFF image ``source`` as a new store, stored alike."""
    group = zarr.open_group(str(source), mode="r")
    attrs = {k: v for k, v in group.attrs.asdict().items() if k == "multiscales"}
    path = attrs["multiscales"][0]["datasets"][0]["path"]
    attrs["multiscales"][0]["datasets"] = attrs["multiscales"][0]["datasets"][:1]
    array = group[path]
    out = zarr.open_group(str(target), mode="w", zarr_format=array.metadata.zarr_format)
    out.attrs.update(attrs)
    copy = out.create_array(
        path,
        shape=(frames, *array.shape[1:]),
        chunks=array.chunks,
        dtype=array.dtype,
        compressors=array.compressors,
        filters=array.filters or None,
    )
    copy[:] = array[:frames]
    return target


def measure(source: str | None, options: dict, output: Path, interval: float) -> dict:
    """Run ``predict(**options)`` in a subprocess (with the package of ``source`` if given),
    sampling the size of ``output`` every ``interval`` s; its seconds and peak bytes."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(Path(source).resolve())
    process = subprocess.Popen(
        [sys.executable, "-c", PREDICT, json.dumps(options)],
        env=env,
        cwd=output.parent,  # not the project root, whose package would shadow ``source``
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak: list = [0, {}]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            found = breakdown(output)
            if sum(found.values()) > peak[0]:
                peak[0], peak[1] = sum(found.values()), found
            time.sleep(interval)

    watcher = threading.Thread(target=sample, daemon=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    watcher.start()
    stdout, stderr = process.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run's processes, reaped
    stop.set()
    watcher.join()
    if process.returncode != 0:
        raise SystemExit(f"predict failed:\n{stderr[-3000:]}")
    seconds = json.loads(stdout.strip().splitlines()[-1])["seconds"]
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "seconds": seconds,
        "cpu": cpu,
        "peak": peak[0],
        "at peak": peak[1],
        "final": tree_bytes(output),
    }


def breakdown(output: Path) -> dict[str, int]:
    """Bytes under ``output`` by entry (and by entry of its work folder)."""
    found: dict[str, int] = {}
    if not output.exists():
        return found
    for entry in list(output.iterdir()):
        inner = list(entry.iterdir()) if entry.name == ".cellulus-scale" and entry.is_dir() else []
        for part in inner or [entry]:
            name = str(part.relative_to(output))
            with contextlib.suppress(OSError):
                found[name] = part.stat().st_size if part.is_file() else tree_bytes(part)
    return found


def parts(output: Path) -> dict[str, int]:
    """Bytes of the finished output by part: image level 0, image pyramid, labels (all
    levels), and the rest."""
    image0 = tree_bytes(output / "0")
    labels = tree_bytes(output / "labels")
    total = tree_bytes(output)
    pyramid = sum(tree_bytes(p) for p in output.iterdir() if p.name.isdigit() and p.name != "0")
    return {
        "image copy": image0,
        "image pyramid": pyramid,
        "labels": labels,
        "other": total - image0 - pyramid - labels,
    }


def files_written(frames: int, side: int, block: int, ngff: str = "0.4") -> dict[str, int]:
    """Files a 2D run writes for a video of ``frames`` frames of ``side`` x ``side`` in blocks
    of ``block`` in NGFF ``ngff``, from the layout the package writes
    (``cellulus_scale.io.ome_zarr.level_chunks``): one file per (frame, block) at level 0 for
    the image copy and the labels (a zarr v2 chunk, or a zarr v3 shard) and per write unit of
    each pyramid level, one per (frame, block) for the scratch OCEs and per stage for the
    recorded block results (3 stages; scratch and records are removed at the end)."""
    from cellulus_scale.io.ome_zarr import NGFF_ZARR_FORMATS, level_chunks, pyramid_factors

    shape = (frames, side, side)
    base = (1, block, block)
    per_level = []
    for factor in pyramid_factors(shape, "tyx"):
        level = tuple(s // f for s, f in zip(shape, factor, strict=True))
        unit = level_chunks(base, factor, level, NGFF_ZARR_FORMATS[ngff])
        per_level.append(math.prod(math.ceil(s / u) for s, u in zip(level, unit, strict=True)))
    blocks = frames * math.ceil(side / block) ** 2
    return {
        "image copy, level 0": per_level[0],
        "image copy, all levels": sum(per_level),
        "labels, all levels": sum(per_level),
        "scratch OCEs (removed)": blocks,
        "block records, 3 stages (removed)": 3 * blocks,
    }


def labels_agreement(a: Path, b: Path) -> str:
    from cellulus_scale.evaluation.metrics import match_pairs, overlap_table
    from cellulus_scale.io.ome_zarr import open_labels

    first = open_labels(a, "cellulus").data.compute()
    second = open_labels(b, "cellulus").data.compute()
    scores = {}
    for threshold in (0.5, 0.9):
        matched = total = 0
        for frame in range(len(first)):
            table = overlap_table(first[frame], second[frame])
            matched += len(match_pairs(table, threshold)[0])
            total += table.n_true + table.n_pred
        scores[threshold] = 2 * matched / max(total, 1)
    same = float(((first > 0) == (second > 0)).mean())
    return (
        f"F1 at IoU 0.5 {scores[0.5]:.4f}, at IoU 0.9 {scores[0.9]:.4f}, "
        f"foreground pixels agreeing {100 * same:.2f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=Path("../shared/data/bbbc039-dev.zarr"))
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--diameter", type=float, required=True)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--tta", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline-source", type=Path, default=None)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--ngff", default="0.4", choices=("0.4", "0.5"), help="this version's")
    parser.add_argument(
        "--files-for",
        default="1000,2048,256",
        help="FRAMES,SIDE,BLOCK: print the files a run writes for such a video (from the layout)",
    )
    args = parser.parse_args()

    frames, side, block = (int(v) for v in args.files_for.split(","))
    for ngff in ("0.4", "0.5"):
        counted = files_written(frames, side, block, ngff)
        print(
            f"files written for {frames} frames of {side}x{side} in blocks of {block}, NGFF {ngff}:"
        )
        for what, count in counted.items():
            print(f"  {what}: {count:,}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="footprint-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = subset(args.input, args.frames, workdir / "input.zarr")
    input_bytes = tree_bytes(source / "0")
    shape = zarr.open_group(str(source), mode="r")["0"].shape
    print(
        f"input: {args.frames} frames of {args.input} {shape}, stored in {input_bytes / 1e6:.2f}"
        f" MB ({input_bytes / np.prod(shape):.2f} bytes per pixel)"
    )
    runs = [(f"this version (NGFF {args.ngff})", None)]
    if args.baseline_source is not None:
        runs.append((f"baseline ({args.baseline_source})", str(args.baseline_source)))
    outputs, peaks = {}, {}
    print(
        "| run | seconds | CPU seconds | peak written MB | peak / input | finished MB |"
        " finished / input |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, package in runs:
        output = workdir / f"out_{len(outputs)}.zarr"
        options = {
            "input_path": str(source),
            "output_path": str(output),
            "model_path": str(args.model.resolve()),
            "diameter": args.diameter,
            "block_size": args.block_size,
            "tta": args.tta,
            "workers": args.workers,
            "device": "cpu",
            "progress": False,
            "overwrite": True,
        }
        if package is None and args.ngff != "0.4":
            options["ngff_version"] = args.ngff
        found = measure(package, options, output, args.interval)
        outputs[name] = output
        peaks[name] = found["at peak"]
        print(
            f"| {name} | {found['seconds']:.1f} | {found['cpu']:.0f} | {found['peak'] / 1e6:.2f} |"
            f" {found['peak'] / input_bytes:.2f}x | {found['final'] / 1e6:.2f} |"
            f" {found['final'] / input_bytes:.2f}x |"
        )
    for name, found in peaks.items():
        largest = sorted(found.items(), key=lambda item: -item[1])[:6]
        shares = ", ".join(f"{k} {v / input_bytes:.2f}x" for k, v in largest)
        print(f"{name}, at the peak: {shares}")
    for name, output in outputs.items():
        shares = ", ".join(f"{k} {v / input_bytes:.2f}x" for k, v in parts(output).items())
        files = sum(len(names) for _, _, names in os.walk(output))
        print(f"{name}, finished output: {shares}; {files} files")
    if len(outputs) == 2:
        first, second = outputs.values()
        print(f"labels, this version against the baseline: {labels_agreement(second, first)}")


if __name__ == "__main__":
    main()
