"""Open OME-Zarr stores in a real napari viewer (through napari-ome-zarr's reader) and report
what a user would see, as JSON: the layers with their shapes, axes and transforms, and, for
every step of every slider, the value each layer shows at a few places.

Run by ``tests/test_napari.py`` under Xvfb (napari needs an OpenGL context; Mesa provides it):

    python tests/napari_probe.py OUT.zarr [OUT2.zarr ...] --json report.json
        [--screenshot shot.png --frame 1 --size 900,600]

One viewer per store; label layers are made visible (napari-ome-zarr loads them hidden), as a
user ticking their eye would. ``--screenshot`` saves the viewer window of the first store.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _process_events() -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()


def _layer_report(layer) -> dict:
    data = layer.data[0] if layer.multiscale else layer.data
    ndim = layer.ndim
    origin = np.asarray(layer.data_to_world(np.zeros(ndim)), float)
    unit = np.asarray(layer.data_to_world(np.ones(ndim)), float) - origin
    return {
        "name": layer.name,
        "kind": type(layer).__name__,
        "ndim": ndim,
        "shape": list(data.shape),
        "levels": len(layer.data) if layer.multiscale else 1,
        "axis_labels": list(layer.axis_labels),
        "units": [str(u) for u in layer.units],
        "world_origin": origin.tolist(),
        "world_pixel": unit.tolist(),
    }


def _sample_points(viewer, count: int = 5) -> list[list[float]]:
    """World points on a count x count grid over the displayed plane, at the sliders'
    positions."""
    point = np.asarray(viewer.dims.point, float)
    displayed = list(viewer.dims.displayed)
    ranges = [viewer.dims.range[axis] for axis in displayed]
    grids = [np.linspace(r.start, r.stop, count + 2)[1:-1] for r in ranges]
    points = []
    for a in grids[0]:
        for b in grids[1]:
            sample = point.copy()
            sample[displayed[0]], sample[displayed[1]] = a, b
            points.append(sample.tolist())
    return points


def _value(layer, world_point) -> tuple[int | None, float | None]:
    value = layer.get_value(world_point, world=True)
    level = 0
    if layer.multiscale and isinstance(value, tuple):
        level, value = value
    if value is None:
        return level, None
    return int(level), float(value)


def probe(path: Path, screenshot: Path | None, frame: int, size: tuple[int, int]) -> dict:
    import napari

    viewer = napari.Viewer(show=True)
    try:
        viewer.window._qt_window.resize(*size)
        viewer.open(str(path), plugin="napari-ome-zarr")
        for layer in viewer.layers:
            layer.visible = True
        _process_events()
        report = {
            "path": str(path),
            "dims": {
                "ndim": viewer.dims.ndim,
                "axis_labels": list(viewer.dims.axis_labels),
                "nsteps": [int(n) for n in viewer.dims.nsteps],
                "not_displayed": list(viewer.dims.not_displayed),
            },
            "layers": [_layer_report(layer) for layer in viewer.layers],
            "slices": [],
        }
        for axis in viewer.dims.not_displayed:
            for step in range(int(viewer.dims.nsteps[axis])):
                viewer.dims.set_current_step(axis, step)
                _process_events()
                points = _sample_points(viewer)
                layers = {}
                for layer in viewer.layers:
                    samples = []
                    for point in points:
                        level, value = _value(layer, point)
                        index = np.asarray(layer.world_to_data(point), float)
                        samples.append(
                            {"level": level, "data_index": index.tolist(), "value": value}
                        )
                    layers[layer.name] = samples
                report["slices"].append(
                    {"axis": int(axis), "step": step, "point": points[0], "layers": layers}
                )
            viewer.dims.set_current_step(axis, 0)
        if screenshot is not None:
            if viewer.dims.not_displayed:
                viewer.dims.set_current_step(viewer.dims.not_displayed[0], frame)
            viewer.reset_view()
            _process_events()
            viewer.screenshot(str(screenshot), canvas_only=False, flash=False)
            report["screenshot"] = str(screenshot)
        return report
    finally:
        viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stores", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--frame", type=int, default=0)
    parser.add_argument("--size", default="900,600", help="Window size W,H (screenshot).")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split(","))
    reports = []
    for index, store in enumerate(args.stores):
        shot = args.screenshot if index == 0 else None
        reports.append(probe(store, shot, args.frame, size))
    args.json.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
