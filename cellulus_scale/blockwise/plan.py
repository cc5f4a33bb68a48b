"""The plan of a blockwise run: input, output, block grid and device, and the method's own
settings, which the engine carries without looking inside. Small and picklable: every task
gets it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cellulus_scale.blockwise.blocks import Block, block_grid
from cellulus_scale.config import NGFF_VERSION
from cellulus_scale.io.location import Location
from cellulus_scale.io.ome_zarr import OmeImage

WORK_DIR = ".cellulus-scale"  # the recorded block results and scratch of an unfinished run

LABELS_NAME = "cellulus"  # the output's labels: labels/cellulus


class MethodSettings(Protocol):
    """What the plan needs of a method's settings: frozen and picklable, and able to say how the
    plan is recorded in the output (``--resume`` compares that record)."""

    def record(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The plan's record: its ``fields`` and these settings, as JSON values."""
        ...


@dataclass(frozen=True)
class Plan:
    """A blockwise run: input, output, blocks, device, and the method with its settings."""

    input_path: str
    input_axes: str
    output_path: str
    block_size: tuple[int, ...]
    frames: int
    channels: int
    spatial_shape: tuple[int, ...]
    device: str
    method: str
    settings: MethodSettings
    #: write the labels into the input's own labels group (output_path is the input)
    into_input: bool = False
    #: the labels' name: labels/<labels_name>
    labels_name: str = LABELS_NAME
    #: the output's NGFF version (writing into the input: the input's)
    ngff_version: str = NGFF_VERSION

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)

    @property
    def work_dir(self) -> str:
        """The run's work folder, relative to the output: in the labels group when writing
        into the input, so that nothing else of it is written to."""
        return f"labels/{WORK_DIR}" if self.into_input else WORK_DIR

    @property
    def output(self) -> Location:
        """Where the output is: a local path or a URL."""
        return Location.of(self.output_path)

    @property
    def work_path(self) -> Location:
        return self.output / self.work_dir

    @property
    def blocks(self) -> list[Block]:
        return block_grid(self.spatial_shape, self.block_size)

    @property
    def work(self) -> list[tuple[int, Block]]:
        """Every (frame, block) of the video: the tasks of one stage."""
        return [(frame, block) for frame in range(self.frames) for block in self.blocks]

    def to_json(self) -> dict[str, Any]:
        """The plan as the output records it (without the per-run thread counts)."""
        fields = {
            "input_path": self.input_path,
            "input_axes": self.input_axes,
            "output_path": self.output_path,
            "block_size": self.block_size,
            "frames": self.frames,
            "channels": self.channels,
            "spatial_shape": self.spatial_shape,
            "device": self.device,
            "method": self.method,
        }
        if self.into_input:
            fields["into_input"] = True
        if self.labels_name != LABELS_NAME:
            fields["labels_name"] = self.labels_name
        if self.ngff_version != NGFF_VERSION:
            fields["ngff_version"] = self.ngff_version
        return self.settings.record(fields)


def make_plan(
    image: OmeImage,
    output_path: str | os.PathLike[str] | Location,
    block_size: int | Sequence[int],
    device: str,
    method: str,
    settings: MethodSettings,
    into_input: bool = False,
    labels_name: str = LABELS_NAME,
    ngff_version: str = NGFF_VERSION,
) -> Plan:
    """The plan of a run on ``image`` in blocks of ``block_size``: one side for every spatial
    axis, or one per axis."""
    frames, channels, depth, height, width = image.canonical_shape
    spatial = (depth, height, width) if image.spatial_dims == 3 else (height, width)
    return Plan(
        input_path=str(image.path),
        input_axes=image.axes,
        output_path=str(Location.of(output_path)),
        block_size=(
            (block_size,) * len(spatial) if isinstance(block_size, int) else tuple(block_size)
        ),
        frames=frames,
        channels=channels,
        spatial_shape=spatial,
        device=device,
        method=method,
        settings=settings,
        into_input=into_input,
        labels_name=labels_name,
        ngff_version=ngff_version,
    )
