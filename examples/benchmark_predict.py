"""Prediction benchmark: seconds per megapixel per stage, network efficiency, frame scaling.

Prints, for simulated videos of --shape and each --frames count:
- seconds per megapixel (of video) for each stage: network, statistics, clustering,
  stitching (assigning pixels to the numbered centres), post-processing, writing the labels,
  and writing pyramids and metadata (the labels stage's wall time is split by the task time
  of its parts);
- the network's efficiency: output pixels per second of the blockwise OCE stage against one
  plain batched forward pass over the same number of output pixels (same TTA passes), and
  the halo overhead of the chosen block size;
- the whole run against the network-only limit: total seconds per megapixel over those of the
  plain forward passes (issue 19's ratio), the passes timed two ways: in one process, times
  the number of workers (``total/network-only``), and on all the run's workers at once
  (``total/concurrent``: the cores' real limit, as the workers share caches and memory
  bandwidth);
- the peak resident memory of the worker processes and of the scheduler, and the seconds per
  frame (issue 19's scaling table: ``--shape 64,64 --frames 10,100,1000``).

Example:
    python examples/benchmark_predict.py --shape 512,512 --frames 10,100 --tta 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cellulus_scale.config import PRESETS
from cellulus_scale.model.checkpoint import load_checkpoint
from cellulus_scale.model.unet import context, smallest_valid_size_at_least
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import train
from cellulus_scale.workflows.predict import predict


def peak_worker_memory(client) -> float:
    """The largest peak resident memory (MB) of the worker processes since they started.

    Read from the process's own high-water mark (``VmHWM``), not ``ru_maxrss``: Linux keeps
    ``ru_maxrss`` across ``execve``, so a worker spawned by this process would report at least
    this process's own peak (training, simulating the video) instead of its own."""

    def peak() -> float:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:  # no /proc (not Linux)
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    return max(client.run(peak).values())


def scheduler_memory(client) -> float:
    """The scheduler's resident memory (MB) at the end of a run, from its own process (with a
    LocalCluster the process that also runs this script and the client)."""

    def resident() -> float:
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    return client.run_on_scheduler(resident)


def plain_forward_rate(model_path: Path, passes: int, threads: int, tile: int = 512) -> float:
    """Output pixels per second (per pass) of plain batched forward passes over large tiles:
    the network alone, no halo beyond one tile's, no noise, I/O or Dask."""
    torch.set_num_threads(threads)
    checkpoint = load_checkpoint(model_path)
    model = checkpoint.build_model()
    size = smallest_valid_size_at_least(
        tile + 2 * context(checkpoint.model_config.depth), checkpoint.model_config.depth
    )
    batch = torch.rand(min(passes, 8), 1, size, size)
    with torch.no_grad():
        model(batch)
        start = time.perf_counter()
        repeats = max(1, passes // len(batch))
        for _ in range(repeats):
            out = model(batch)
        seconds = time.perf_counter() - start
    return out.shape[-1] * out.shape[-2] * len(batch) * repeats / seconds / passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="256,256")
    parser.add_argument("--frames", default="4,16")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--tta", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--clustering", default="meanshift", choices=["meanshift", "sklearn"])
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    from distributed import Client, LocalCluster

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model = folder / "model.pt"
        train(
            write_simulation(folder / "train.zarr", SimulationSpec(frames=2, shape=shape)),
            model,
            preset=args.preset,
            epochs=1,
            min_crops_per_epoch=8,
            progress=False,
        )
        forward = plain_forward_rate(model, args.tta, 1) * args.workers
        concurrent = None
        print(
            f"# shape {shape}, block {args.block_size}, tta {args.tta}, preset {args.preset},"
            f" {args.workers} workers x 1 thread, clustering {args.clustering}"
        )
        halo = context(load_checkpoint(model).model_config.depth)
        overhead = ((args.block_size + 2 * halo) ** 2 / args.block_size**2) - 1
        print(f"halo {halo} px per side: {100 * overhead:.1f}% more input than output pixels")
        print(
            "seconds per megapixel of video, per stage; net-efficiency = blockwise OCE throughput"
            " / plain batched forward passes\n"
            "frames    network  statistic  clusterin  stitching  postproc.  write-lab   pyramids"
            "    total  net-efficiency  total/network-only  total/concurrent  peak-worker-MB"
            "  scheduler-MB"
            "  s/frame"
        )
        for frames in (int(v) for v in args.frames.split(",")):
            video = write_simulation(
                folder / f"v{frames}.zarr", SimulationSpec(frames=frames, shape=shape, seed=1)
            )
            cluster = LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                host="127.0.0.1",
                dashboard_address=None,
            )
            with Client(cluster) as client:
                result = predict(
                    video,
                    folder / f"o{frames}.zarr",
                    model,
                    diameter=24,
                    block_size=args.block_size,
                    tta=args.tta,
                    overwrite=True,
                    progress=False,
                    client=client,
                    clustering=args.clustering,
                )
                memory = peak_worker_memory(client)
                if concurrent is None:  # plain passes on every worker at once
                    rates = client.run(plain_forward_rate, model, args.tta, 1)
                    concurrent = sum(rates.values())
                    threaded = plain_forward_rate(model, args.tta, args.workers)
                    print(
                        f"plain passes: {1e6 / forward:.2f} s/Mpx in one process x"
                        f" {args.workers}, {1e6 / concurrent:.2f} s/Mpx on the workers at once,"
                        f" {1e6 / threaded:.2f} s/Mpx in one process of {args.workers} threads"
                    )
                scheduler = scheduler_memory(client)
            cluster.close()
            megapixels = frames * shape[0] * shape[1] / 1e6
            stages = [
                "network",
                "statistics",
                "clustering",
                "stitching",
                "post-processing",
                "writing labels",
                "writing",
            ]
            per = [result.seconds.get(s, 0.0) / megapixels for s in stages]
            efficiency = (megapixels * 1e6 / result.seconds["network"]) / forward
            print(
                f"{frames:6d}  "
                + "  ".join(f"{v:8.2f}" for v in per)
                + f"  {sum(per):6.2f}  {efficiency:17.2f}"
                + f"  {sum(per) / (1e6 / forward):18.2f}  {sum(per) / (1e6 / concurrent):16.2f}"
                + f"  {memory:14.0f}"
                + f"  {scheduler:12.0f}  {sum(per) * megapixels / frames:7.3f}"
            )


if __name__ == "__main__":
    main()
