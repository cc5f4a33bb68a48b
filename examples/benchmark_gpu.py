"""GPU benchmark: frames per second of the whole predict pipeline, and how busy the GPU is.

Simulates a video of --frames x --shape, trains a model of --preset (default ``paper``: the
paper's mini U-Net, 64 feature maps, depth 1) for --train-minutes on the GPU, then, for each
--precision, runs the real ``predict`` with --tta passes on predict's own embedded cluster:
--workers single-threaded CPU workers plus one worker per GPU whose threads run the network
tasks (``cellulus_scale.blockwise.cluster.gpu_cluster``). The cluster first segments one
frame, so model loading and CUDA start-up are left out. Prints:

- frames per second of the whole run (network, clustering, stitching, writing) and of the
  network stage alone;
- the GPU's busy share: NVML's utilisation (the share of time a kernel was running), averaged
  over the whole run and over the network stage; and the most GPU memory in use;
- the network stage's efficiency: its output pixels per second against plain batched forward
  passes of the same model, in the same precision, over --tile sized tiles;
- F1 and SEG of the labels against the simulator's ground truth.

Runs on the CPU too (no busy share there), so the script itself can be checked anywhere.

    python examples/benchmark_gpu.py --shape 1024,1024 --frames 32 --tta 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from benchmark_training import steady_state  # noqa: I001 (beside this script)

from cellulus_scale.blockwise.cluster import dask_client, local_gpu_count
from cellulus_scale.config import PRECISIONS, PRESETS
from cellulus_scale.evaluation.evaluate import evaluate
from cellulus_scale.kernels.inference import inference_precision
from cellulus_scale.model.checkpoint import load_checkpoint
from cellulus_scale.model.unet import context, smallest_valid_size_at_least
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import train
from cellulus_scale.workflows.predict import predict


class BusySampler(threading.Thread):
    """Samples the GPU's utilisation (%) and memory in use (MB) every ``interval`` seconds,
    through NVML (``nvidia-ml-py``) or, failing that, ``nvidia-smi``."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []
        self._stop_event = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)

            def read() -> tuple[float, float]:
                used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), used

        except Exception:  # no NVML bindings: ask nvidia-smi (slower, so sample less often)
            self.interval = max(interval, 0.2)

            def read() -> tuple[float, float]:
                line = subprocess.run(
                    [
                        "nvidia-smi",
                        "--id=0",
                        "--query-gpu=utilization.gpu,memory.used",
                        "--format=csv,noheader,nounits",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                busy, used = (float(v) for v in line.split(","))
                return busy, used

        self._read = read

    def run(self) -> None:
        while not self._stop_event.is_set():
            busy, used = self._read()
            self.samples.append((time.perf_counter(), busy, used))
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def busy_share(self, start: float, stop: float) -> float:
        """Mean utilisation (0..1) of the samples taken between ``start`` and ``stop``."""
        inside = [busy for t, busy, _ in self.samples if start <= t <= stop]
        return float(np.mean(inside)) / 100 if inside else float("nan")

    def peak_memory(self) -> float:
        return max((used for _, _, used in self.samples), default=float("nan"))


def plain_forward_rates(
    model_path: Path, device: torch.device, passes: int, tile: int, seconds: float = 2.0
) -> dict[str, float]:
    """Output pixels per second, at ``passes`` test-time passes, of plain batched forward passes
    (a batch of ``passes`` copies of one ``tile``-sized tile with its context) in each precision
    (on the CPU all are float32): the network alone."""
    checkpoint = load_checkpoint(model_path)
    model = checkpoint.build_model(device)
    depth = checkpoint.model_config.depth
    size = smallest_valid_size_at_least(tile + 2 * context(depth), depth)
    dims = checkpoint.model_config.spatial_dims
    batch = torch.rand(passes, checkpoint.model_config.in_channels, *([size] * dims), device=device)
    rates = {}
    for name in PRECISIONS:
        with torch.no_grad(), inference_precision(device, name):
            out = model(batch)  # warm-up (and cuDNN's algorithm choice)
            if device.type == "cuda":
                torch.cuda.synchronize()
            repeats, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds or repeats < 2:
                out = model(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                repeats += 1
            elapsed = time.perf_counter() - start
        rates[name] = out.shape[-1] * out.shape[-2] * repeats / elapsed
    del model, batch, out
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU's memory to the workers
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1024,1024", help="frame size Y,X")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--tta", type=int, default=8, help="test-time passes (default 8)")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None, help="CPU workers (predict's default)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated")
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--train-minutes", type=float, default=1.0)
    parser.add_argument("--tile", type=int, default=1024, help="tile of the plain forward pass")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(
        f"# {name}, torch {torch.__version__}, {os.cpu_count()} CPU cores;"
        f" {args.frames} frames of {shape[0]}x{shape[1]}, block {args.block_size},"
        f" tta {args.tta}, preset {args.preset}"
    )
    figures: dict[str, object] = {"device": name, "args": vars(args) | {"json": None}}
    with tempfile.TemporaryDirectory(prefix="cellulus-gpu-") as folder:
        folder = Path(folder)
        start = time.perf_counter()
        video = write_simulation(
            folder / "video.zarr", SimulationSpec(frames=args.frames, shape=shape, seed=1)
        )
        first = write_simulation(
            folder / "first.zarr", SimulationSpec(frames=1, shape=shape, seed=2)
        )
        print(f"simulated in {time.perf_counter() - start:.1f} s")
        model = folder / "model.pt"
        trained = train(
            video,
            model,
            preset=args.preset,
            max_minutes=args.train_minutes,
            progress=False,
        )
        per_step, waiting = steady_state(model.with_suffix(".loss.csv"))
        print(
            f"trained {trained.steps} steps on {device.type} in {trained.seconds:.1f} s"
            f" ({per_step:.3f} s/step from step 2, {100 * waiting:.1f}% waiting for data,"
            f" loss {trained.final_loss:.4f})"
        )
        figures["training"] = {
            "steps": trained.steps,
            "seconds_per_step": per_step,
            "data_wait": waiting,
        }
        rates = plain_forward_rates(model, device, args.tta, args.tile)
        print(
            f"plain forward, output Mpx/s at {args.tta} passes: "
            + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in rates.items())
        )
        figures["plain_forward_mpx_per_s"] = {k: v / 1e6 for k, v in rates.items()}
        megapixels = args.frames * shape[0] * shape[1] / 1e6
        rows = []
        gpus = local_gpu_count()
        with dask_client(workers=args.workers, gpus=gpus) as client:  # predict's own layout
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            on_gpu = sum(1 for w in workers if (w.get("resources") or {}).get("GPU"))
            print(
                f"cluster: {len(workers) - on_gpu} CPU workers + {on_gpu} GPU workers"
                f" on {gpus} GPU(s), {sum(w['nthreads'] for w in workers)} threads"
            )
            settings = {
                "diameter": 24,
                "block_size": args.block_size,
                "tta": args.tta,
                "overwrite": True,
                "progress": False,
                "client": client,
            }
            predict(first, folder / "warm.zarr", model, **settings)
            for precision in args.precisions.split(","):
                sampler = BusySampler() if device.type == "cuda" else None
                if sampler is not None:
                    sampler.start()
                out = folder / f"{precision}.zarr"
                start = time.perf_counter()
                result = predict(video, out, model, precision=precision, **settings)
                wall = time.perf_counter() - start
                if sampler is not None:
                    sampler.stop()
                scores = evaluate(out, video, client=client).overall
                nan = float("nan")
                setup = wall - sum(result.seconds.values())  # before the network stage
                network = result.seconds["network"]
                busy = (
                    (nan, nan, nan)
                    if sampler is None
                    else (
                        sampler.busy_share(start, start + wall),
                        sampler.busy_share(start + setup, start + setup + network),
                        sampler.peak_memory(),
                    )
                )
                row = {
                    "precision": precision,
                    "seconds": wall,
                    "fps": args.frames / wall,
                    "network_fps": args.frames / network,
                    "busy_run": busy[0],
                    "busy_network": busy[1],
                    "peak_gpu_mb": busy[2],
                    "efficiency": megapixels * 1e6 / network / rates[precision],
                    "f1": scores.f1,
                    "seg": scores.seg,
                    "stages": {k: round(v, 3) for k, v in result.seconds.items()},
                }
                rows.append(row)
                print(f"{precision}: stage seconds {row['stages']}")
        figures["runs"] = rows
        print(
            "precision  seconds   fps  network-fps  busy(run)  busy(network)  peak-GPU-MB"
            "  net-efficiency     F1    SEG"
        )
        for r in rows:
            print(
                f"{r['precision']:>9}  {r['seconds']:7.1f}  {r['fps']:4.1f}"
                f"  {r['network_fps']:11.1f}"
                f"  {100 * r['busy_run']:8.0f}%  {100 * r['busy_network']:12.0f}%"
                f"  {r['peak_gpu_mb']:11.0f}  {r['efficiency']:14.2f}  {r['f1']:5.3f}"
                f"  {r['seg']:5.3f}"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
