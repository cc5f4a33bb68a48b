"""Linking a segmented video into tracks (``cellulus-scale link``, ``predict --link``).

:func:`link` adds to a finished store (a ``predict`` output, or any OME-Zarr image with an
instance label image) the label image ``labels/tracks``, in which every nucleus keeps one ID
through time, with its track table (ID, first frame, last frame, parent) in its metadata, and
the GEFF graph ``tracks.geff`` beside the labels. The stages are those of
:mod:`cellulus_scale.tracking.stages`, run by the blockwise engine; like ``predict``, the store
is marked incomplete from the first write until the last, and ``--resume`` finishes an
interrupted run from the recorded block results.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellulus_scale.blockwise.engine import RunOptions, attach_session
from cellulus_scale.blockwise.plan import make_plan
from cellulus_scale.blockwise.store import WORK_DIR
from cellulus_scale.config import TrackingConfig, default_of
from cellulus_scale.errors import UserInputError
from cellulus_scale.io import ome_zarr
from cellulus_scale.io.location import local_store
from cellulus_scale.tracking.stages import (
    GEFF_NAME,
    LinkSettings,
    finish_tracks,
    run_linking,
)


@dataclass(frozen=True)
class LinkRunResult:
    """What a linking run did: the counts of :meth:`LinkResult.summary` and the time taken."""

    store: Path
    labels: str  # the label image written (labels/<labels>)
    geff: Path
    frames: int
    summary: dict[str, Any]
    blocks: int
    recomputed: dict[str, int]
    seconds: float


def link_settings(
    labels: str = "cellulus",
    max_gap: int = default_of(TrackingConfig, "max_gap"),
    max_distance: float | None = None,
) -> LinkSettings:
    """The settings of a linking run of ``labels/<labels>`` into ``labels/tracks``."""
    if labels == LinkSettings.target:
        raise UserInputError(
            f"--labels {labels} is the label image linking writes",
            "link the per-frame labels (e.g. --labels cellulus)",
        )
    return LinkSettings(
        source=labels, tracking=TrackingConfig(max_gap=max_gap, max_distance=max_distance)
    )


def default_link_block_size(chunks: tuple[int, ...], axes: str) -> int:
    """The labels' own spatial chunk (y), so that each task reads whole chunks; at least 64."""
    sizes = dict(zip(axes, chunks, strict=True))
    return max(64, int(sizes.get("y", 256)))


def link(
    store: str | os.PathLike[str],
    labels: str = "cellulus",
    max_gap: int = default_of(TrackingConfig, "max_gap"),
    max_distance: float | None = None,
    block_size: int | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    client: Any = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> LinkRunResult:
    """Link the objects of ``labels/<labels>`` of ``store`` over time; write ``labels/tracks``
    (track IDs), its track table and ``tracks.geff`` into the store."""
    start = time.perf_counter()
    store = local_store(store, "link")
    settings = link_settings(labels, max_gap, max_distance)
    status = ome_zarr.run_status(store)
    if resume:
        if status.get("status") != "incomplete" or status.get("command") != "link":
            raise UserInputError(f"--resume: {store} has no interrupted link run", "drop --resume")
        if status.get("link") != settings.to_json():
            raise UserInputError(
                f"--resume: the settings differ from those of the interrupted link run in {store}",
                "rerun with the same options, or start again with --overwrite",
            )
    else:
        ome_zarr.check_complete(store)
    source = ome_zarr.open_labels(store, labels)
    if source.data.dtype.kind not in "iu":
        raise UserInputError(
            f"labels/{labels} of {store} have dtype {source.data.dtype}, not an integer type",
            "link instance label images (integer IDs, 0 = background)",
        )
    if source.canonical_shape[1] != 1:
        raise UserInputError(
            f"labels/{labels} of {store} have {source.canonical_shape[1]} channels",
            "label images must have a single channel",
        )
    target = store / "labels" / settings.target
    if not resume and target.exists() and not overwrite:
        raise UserInputError(
            f"{store} already has labels/{settings.target}",
            "pass --overwrite to link again",
        )
    size = block_size or default_link_block_size(source.data.chunksize, source.axes)
    if size < 16:
        raise UserInputError(f"--block-size {size} is too small", "use e.g. --block-size 256")
    root = ome_zarr.open_group_for_update(store)
    version = ome_zarr.ngff_version_of(root)
    plan = make_plan(source, store, size, "cpu", "link", settings, ngff_version=version)
    previous = status.get("link_previous_command", status.get("command")) or "link"
    if not resume:
        ome_zarr.unlist_labels(root, settings.target)
        for stale in (target, store / GEFF_NAME, store / WORK_DIR):
            ome_zarr.remove_store(stale)
    ome_zarr.mark_status(
        root,
        "incomplete",
        command="link",
        link=settings.to_json(),
        link_previous_command=previous,
    )
    options = RunOptions(scheduler, workers, client, overwrite, resume, progress)
    with attach_session(plan, source, root, options) as session:
        result = run_linking(session, settings, ome_zarr.voxel_spacing(source))
    finish_tracks(root, plan, settings, result, source.space)
    ome_zarr.remove_store(store / WORK_DIR)
    summary = result.summary()
    recorded = dict(root.attrs.get(ome_zarr.STATUS_KEY, {}))
    recorded.pop("link_previous_command", None)
    root.attrs[ome_zarr.STATUS_KEY] = recorded
    ome_zarr.mark_status(
        root, "complete", command=previous, link=settings.to_json(), tracks=summary
    )
    return LinkRunResult(
        store,
        settings.target,
        store / GEFF_NAME,
        plan.frames,
        summary,
        len(plan.work),
        session.recomputed,
        time.perf_counter() - start,
    )
