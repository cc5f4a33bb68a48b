"""Tracking: linking objects over time (continuation, appearance, disappearance, a gap, a
division), track IDs independent of block size and worker count, resume, the GEFF and CTC exports
read back by their own readers, evaluate --tracks, and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from cellulus_scale.cli.main import main
from distributed import Client, LocalCluster

from cellulus_scale.errors import UserInputError
from cellulus_scale.evaluation.tracks import evaluate_tracks
from cellulus_scale.io import ome_zarr
from cellulus_scale.io.tracks import read_track_table
from cellulus_scale.simulation.simulate import SimulationSpec
from cellulus_scale.simulation.store import write_simulation
from cellulus_scale.tracking import stages
from cellulus_scale.tracking.export import export_ctc
from cellulus_scale.workflows.link import link

SHAPE = (96, 128)
FRAMES = 8


def disc(labels: np.ndarray, centre: tuple[float, float], radius: float, value: int) -> None:
    y, x = np.ogrid[: labels.shape[0], : labels.shape[1]]
    labels[(y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2] = value


def scenario_video() -> np.ndarray:
    """Five nuclei, IDs unique per frame as predict writes them (10 t + k): A moves along
    (k=1), B appears at t=3 (2), C leaves after t=4 (3), D is missing at t=3 (4), E divides
    into two (6, 7) at t=4."""
    video = np.zeros((FRAMES, *SHAPE), np.uint32)
    for t in range(FRAMES):
        frame = video[t]
        disc(frame, (20, 20 + 2 * t), 8, 10 * t + 1)
        if t >= 3:
            disc(frame, (70, 20), 8, 10 * t + 2)
        if t <= 4:
            disc(frame, (20, 100), 8, 10 * t + 3)
        if t != 3:
            disc(frame, (70, 55 + t), 8, 10 * t + 4)
        if t <= 3:
            disc(frame, (70, 100), 9, 10 * t + 5)
        else:
            disc(frame, (70, 93), 6.4, 10 * t + 6)
            disc(frame, (70, 107), 6.4, 10 * t + 7)
    return video


def label_store(path: Path, labels: np.ndarray, name: str = "cellulus", chunk: int = 64) -> Path:
    """A (t, y, x) label video as an NGFF image (its masks as intensities) with labels/NAME."""
    chunks = (1, chunk, chunk)
    root = ome_zarr.write_image(
        path,
        da.from_array((labels > 0).astype(np.uint16) * 1000, chunks=chunks),
        "tyx",
        (1.0, 1.0, 1.0),
        path.stem,
    )
    ome_zarr.write_labels(root, name, da.from_array(labels, chunks=chunks), "tyx", (1.0,) * 3)
    return path


def tracks_of(store: Path) -> np.ndarray:
    return ome_zarr.open_labels(store, "tracks").data.compute()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, client: Client) -> Path:
    store = label_store(tmp_path_factory.mktemp("scenario") / "video.zarr", scenario_video())
    link(store, client=client, progress=False)
    return store


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SimulationSpec(frames=10, shape=(200, 232), seed=3)
    return write_simulation(tmp_path_factory.mktemp("simulated") / "video.zarr", spec)


def test_continuation_appearance_disappearance_gap_and_division(scenario):
    table = read_track_table(scenario, "tracks")
    # numbered by first frame, then ID there: A, C, D, E from frame 0, B at 3, daughters at 4
    assert table.tolist() == [
        [1, 0, 7, 0],  # A continues
        [2, 0, 4, 0],  # C leaves after frame 4
        [3, 0, 7, 0],  # D keeps its track across the gap at frame 3
        [4, 0, 3, 0],  # E, the mother, ends before the division
        [5, 3, 7, 0],  # B appears
        [6, 4, 7, 4],  # the daughters, whose parent is E
        [7, 4, 7, 4],
    ]
    tracks, source = tracks_of(scenario), scenario_video()
    for t in range(FRAMES):  # the same objects, renamed
        assert np.array_equal(tracks[t] > 0, source[t] > 0)
    assert set(tracks[np.arange(FRAMES), 20, 20 + 2 * np.arange(FRAMES)]) == {1}
    assert tracks[3, 70, 58] == 0 and tracks[2, 70, 57] == tracks[4, 70, 59] == 3
    status = ome_zarr.run_status(scenario)
    assert status["status"] == "complete"
    assert status["tracks"]["divisions"] == 1 and status["tracks"]["gaps_closed"] == 1
    assert ome_zarr.open_image(scenario).labels == ("cellulus", "tracks")


def test_max_gap_zero_starts_a_new_track_after_a_gap(tmp_path, client):
    store = label_store(tmp_path / "video.zarr", scenario_video())
    link(store, max_gap=0, client=client, progress=False)
    table = read_track_table(store, "tracks")
    assert [0, 2, 0] in table[:, 1:].tolist()  # D ends before the gap
    assert len(table) == 8 and ome_zarr.run_status(store)["tracks"]["gaps_closed"] == 0


def test_two_nuclei_merged_by_the_segmentation_keep_their_tracks(tmp_path, client):
    """Two nuclei segmented as one object in frames 3 and 4 part again: no division; each
    keeps its track (the one the merged object did not continue resumes after the merge)."""
    video = np.zeros((FRAMES, *SHAPE), np.uint32)
    for t in range(FRAMES):
        if t in (3, 4):
            disc(video[t], (48, 47), 8, 10 * t + 1)
            disc(video[t], (48, 63), 8, 10 * t + 1)
        else:
            left, right = (40, 70) if t < 3 else (44, 68)
            disc(video[t], (48, left), 8, 10 * t + 1)
            disc(video[t], (48, right), 8, 10 * t + 2)
    store = label_store(tmp_path / "video.zarr", video)
    link(store, client=client, progress=False)
    assert read_track_table(store, "tracks").tolist() == [[1, 0, 7, 0], [2, 0, 7, 0]]
    tracks = tracks_of(store)
    assert tracks[0, 48, 40] == tracks[7, 48, 44] and tracks[0, 48, 70] == tracks[7, 48, 68]
    assert ome_zarr.run_status(store)["tracks"]["divisions"] == 0


def test_a_nucleus_cut_in_two_for_a_frame_is_no_division(tmp_path, client):
    video = np.zeros((FRAMES, *SHAPE), np.uint32)
    for t in range(FRAMES):
        disc(video[t], (48, 60), 9, 10 * t + 1)
        if t == 3:  # the segmentation cuts it in two for one frame
            video[t, :, 60:][video[t, :, 60:] > 0] = 10 * t + 2
    store = label_store(tmp_path / "video.zarr", video)
    link(store, client=client, progress=False)
    assert read_track_table(store, "tracks").tolist() == [[1, 0, 7, 0], [2, 3, 3, 0]]
    assert ome_zarr.run_status(store)["tracks"]["divisions"] == 0


def test_geff_export_reads_back(scenario):
    import geff

    graph, metadata = geff.read(str(scenario / "tracks.geff"))
    source = scenario_video()
    objects = sum(len(np.unique(frame)) - 1 for frame in source)
    assert graph.number_of_nodes() == objects
    divisions = [(a, b) for a, b, d in graph.edges(data=True) if d["division"]]
    assert len(divisions) == 2 and divisions[0][0] == divisions[1][0]
    mother = graph.nodes[divisions[0][0]]
    assert (mother["t"], mother["seg_id"]) == (3, 4)
    assert {graph.nodes[b]["seg_id"] for _, b in divisions} == {6, 7}
    skips = [(a, b) for a, b in graph.edges if graph.nodes[b]["t"] - graph.nodes[a]["t"] == 2]
    assert len(skips) == 1 and graph.nodes[skips[0][0]]["seg_id"] == 3
    node = next(n for n, v in graph.nodes(data=True) if v["t"] == 0 and v["seg_id"] == 1)
    assert graph.nodes[node]["y"] == pytest.approx(20) and graph.nodes[node]["x"] == pytest.approx(
        20
    )
    assert [a.name for a in metadata.axes] == ["t", "y", "x"]
    assert metadata.track_node_props == {"tracklet": "track_id"}
    # one edge into every node but the first of each of the 7 tracks, and into both daughters
    assert graph.number_of_edges() == objects - 7 + 2


def test_ctc_export_reads_back_with_traccuracy(scenario, tmp_path):
    from traccuracy.loaders import load_ctc_data

    done = export_ctc(scenario, tmp_path / "RES")
    assert done.frames == FRAMES and done.split == 1  # D is split at its gap
    lines = np.loadtxt(tmp_path / "RES" / "res_track.txt", dtype=int)
    assert [3, 0, 2, 0] in lines.tolist() and [8, 4, 7, 3] in lines.tolist()
    graph = load_ctc_data(str(tmp_path / "RES"), str(tmp_path / "RES" / "res_track.txt"))
    assert graph.graph.number_of_nodes() == sum(len(np.unique(f)) - 1 for f in scenario_video())
    assert len(graph.get_divisions()) == 1
    assert sorted(p.name for p in (tmp_path / "RES").glob("*.tif"))[0] == "mask000.tif"


def test_track_ids_do_not_depend_on_block_size_or_workers(simulated, tmp_path, client):
    results = {}
    for size in (64, 96, 232):
        store = tmp_path / f"b{size}.zarr"
        shutil.copytree(simulated, store)
        link(store, labels="ground_truth", block_size=size, client=client, progress=False)
        results[size] = (tracks_of(store), read_track_table(store, "tracks"))
    store = tmp_path / "one_worker.zarr"
    shutil.copytree(simulated, store)
    link(store, labels="ground_truth", block_size=96, workers=1, progress=False)
    results["one worker"] = (tracks_of(store), read_track_table(store, "tracks"))
    labels, table = results[232]
    assert len(table) > 40 and (table[:, 3] > 0).sum() >= 4
    for other_labels, other_table in results.values():
        assert np.array_equal(other_labels, labels)
        assert np.array_equal(other_table, table)


def test_linking_the_ground_truth_gives_its_tracks(simulated, tmp_path, client):
    store = tmp_path / "video.zarr"
    shutil.copytree(simulated, store)
    link(store, labels="ground_truth", client=client, progress=False)
    truth = read_track_table(store, "ground_truth")
    found = read_track_table(store, "tracks")
    assert np.array_equal(found[:, 1:3], truth[:, 1:3]) and np.array_equal(
        found[:, 3] > 0, truth[:, 3] > 0
    )
    report = evaluate_tracks(store, client=client)
    assert report.scores.tra == 1.0 and report.scores.division_f1 == 1.0
    # the same objects without links: every object its own track
    truth_labels = ome_zarr.open_labels(store, "ground_truth").data.compute()
    offsets = (1000 * np.arange(truth_labels.shape[0], dtype=np.uint32))[:, None, None]
    per_frame = np.where(truth_labels > 0, truth_labels + offsets, 0).astype(np.uint32)
    root = ome_zarr.open_group_for_update(store)
    ome_zarr.write_labels(root, "unlinked", da.from_array(per_frame), "tyx", (1.0,) * 3)
    unlinked = evaluate_tracks(store, pred_labels="unlinked", client=client).scores
    assert unlinked.det == 1.0 and unlinked.lnk == 0.0 and unlinked.tra < 0.9


def test_simulated_ground_truth_carries_its_track_table(simulated):
    table = read_track_table(simulated, "ground_truth")
    divisions = ome_zarr.run_status(simulated)["divisions"]
    assert {(int(r[0]), int(r[3])) for r in table if r[3]} == {(d, m) for _, m, d in divisions}
    labels = ome_zarr.open_labels(simulated, "ground_truth").data.compute()
    for track, first, last, _ in table:
        present = np.flatnonzero([(labels[t] == track).any() for t in range(labels.shape[0])])
        assert (present[0], present[-1]) == (first, last)


def test_interrupted_link_resumes_to_identical_tracks(scenario, tmp_path, monkeypatch):
    store = label_store(tmp_path / "video.zarr", scenario_video())
    relabel = stages.relabel_task

    def failing(plan, frame, block, *args):
        if frame == 5:
            raise RuntimeError("interrupted")
        return relabel(plan, frame, block, *args)

    cluster = LocalCluster(n_workers=1, processes=False, dashboard_address=":0")
    with Client(cluster) as local:
        monkeypatch.setattr(stages, "relabel_task", failing)
        with pytest.raises(RuntimeError, match="interrupted"):
            link(store, client=local, progress=False)
        monkeypatch.setattr(stages, "relabel_task", relabel)
        assert ome_zarr.run_status(store)["status"] == "incomplete"
        with pytest.raises(UserInputError, match="--resume"):
            link(store, client=local, progress=False)
        with pytest.raises(UserInputError, match="--resume"):
            evaluate_tracks(store, store, pred_labels="cellulus", truth_labels="cellulus")
        assert "tracks" not in ome_zarr.open_image(store).labels
        done = link(store, client=local, resume=True, progress=False)
    cluster.close()
    assert done.recomputed["link-objects"] == 0
    assert 0 < done.recomputed["link-labels"] < done.blocks
    assert ome_zarr.run_status(store)["status"] == "complete"
    assert not (store / ".cellulus-scale").exists()
    assert np.array_equal(tracks_of(store), tracks_of(scenario))
    assert np.array_equal(read_track_table(store, "tracks"), read_track_table(scenario, "tracks"))


def test_cli_link_evaluate_and_export(simulated, tmp_path, cli_runner):
    store = tmp_path / "video.zarr"
    shutil.copytree(simulated, store)
    result = cli_runner.invoke(
        main, ["link", str(store), "--labels", "ground_truth", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "divisions" in result.output and (store / "tracks.geff").exists()
    again = cli_runner.invoke(main, ["link", str(store), "--labels", "ground_truth"])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    scores = tmp_path / "tracks.json"
    result = cli_runner.invoke(main, ["evaluate", str(store), "--tracks", "--json", str(scores)])
    assert result.exit_code == 0, result.stderr
    assert "TRA" in result.output and json.loads(scores.read_text())["tracks"]["tra"] == 1.0
    result = cli_runner.invoke(main, ["export-ctc", str(store), str(tmp_path / "RES")])
    assert result.exit_code == 0 and (tmp_path / "RES" / "res_track.txt").exists()


def test_cli_predict_link_end_to_end(simulated_store, tmp_path, cli_runner):
    out = tmp_path / "out.zarr"
    args = ["predict", str(simulated_store), str(out), "--method", "watershed"]
    args += ["--diameter", "16", "--block-size", "64", "--workers", "1", "--link"]
    result = cli_runner.invoke(main, args)
    assert result.exit_code == 0, result.stderr
    assert "link-objects 16/16" in result.output and "tracks:" in result.output
    assert ome_zarr.open_image(out).labels == ("cellulus", "tracks")
    status = ome_zarr.run_status(out)
    assert status["status"] == "complete" and status["command"] == "predict"
    assert status["link"]["max_gap"] == 2 and status["tracks"]["tracks"] > 0
    segmented = ome_zarr.open_labels(out, "cellulus").data.compute()
    assert np.array_equal(tracks_of(out) > 0, segmented > 0)
    assert read_track_table(out, "tracks") is not None and (out / "tracks.geff").exists()


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("no labels", ("no label image named 'cellulus'",)),
        ("incomplete", ("incomplete", "--resume")),
        ("resume a complete store", ("--resume", "no interrupted link run")),
        ("link the tracks", ("--labels tracks",)),
    ],
)
def test_cli_link_refuses_bad_input_in_one_line(case, words, tmp_path, cli_runner):
    store = tmp_path / "video.zarr"
    args = ["link", str(store)]
    if case == "no labels":
        ome_zarr.write_image(
            store, da.zeros((2, 32, 32), np.uint16, chunks=(1, 32, 32)), "tyx", (1,) * 3, "v"
        )
    else:
        label_store(store, scenario_video()[:2])
    if case == "incomplete":
        ome_zarr.mark_status(zarr.open_group(str(store), mode="r+"), "incomplete", command="link")
    if case == "resume a complete store":
        args.append("--resume")
    if case == "link the tracks":
        args += ["--labels", "tracks"]
    result = cli_runner.invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0]


def test_3d_video_links_and_exports(tmp_path, client):
    import geff

    spec = SimulationSpec(frames=3, shape=(16, 64, 64), diameter=12.0, seed=2)
    store = write_simulation(tmp_path / "video.zarr", spec)
    link(store, labels="ground_truth", block_size=32, client=client, progress=False)
    truth = ome_zarr.open_labels(store, "ground_truth").data.compute()
    assert np.array_equal(tracks_of(store) > 0, truth > 0)
    assert evaluate_tracks(store, client=client).scores.tra == 1.0
    _, metadata = geff.read(str(store / "tracks.geff"))
    assert [a.name for a in metadata.axes] == ["t", "z", "y", "x"]
    done = export_ctc(store, tmp_path / "RES")
    assert done.frames == 3 and (tmp_path / "RES" / "mask002.tif").exists()


@pytest.mark.parametrize("z_step, follower", [(1.0, "above"), (4.0, "beside")])
def test_3d_linking_measures_moves_in_physical_distance(tmp_path, client, z_step, follower):
    """A nucleus (frame 0) is followed by the nearer of two (frame 1): one 3 planes above it,
    one 8 pixels beside it. With planes 4 pixels apart (the NGFF scale) the one beside is
    nearer (8 against 12); with cubic voxels, the one above (3 against 8)."""
    labels = np.zeros((2, 12, 32, 24), np.uint32)
    labels[0, 3:6, 9:12, 9:12] = 1
    labels[1, 6:9, 9:12, 9:12] = 2  # above: 3 planes up
    labels[1, 3:6, 17:20, 9:12] = 3  # beside: 8 pixels along y
    store = tmp_path / "video.zarr"
    scale = (1.0, z_step, 1.0, 1.0)
    chunks = (1, 12, 32, 24)
    root = ome_zarr.write_image(
        store,
        da.from_array((labels > 0).astype(np.uint16) * 1000, chunks=chunks),
        "tzyx",
        scale,
        "video",
    )
    ome_zarr.write_labels(root, "cellulus", da.from_array(labels, chunks=chunks), "tzyx", scale)
    link(store, max_distance=20, client=client, progress=False)
    tracks = tracks_of(store)
    first = tracks[0][labels[0] == 1][0]
    followed = {"above": 2, "beside": 3}[follower]
    assert tracks[1][labels[1] == followed][0] == first
    other = 5 - followed
    assert tracks[1][labels[1] == other][0] != first
