"""Intensity normalisation: the map a model was trained with, stored in its checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Normalisation:
    """Maps raw intensities to about [0, 1]: (x - low) / (high - low)."""

    low: float
    high: float

    def apply(self, values: np.ndarray) -> np.ndarray:
        scale = self.high - self.low if self.high > self.low else 1.0
        return ((values.astype(np.float32) - np.float32(self.low)) / np.float32(scale)).astype(
            np.float32
        )

    def to_dict(self) -> dict[str, float]:
        return {"low": float(self.low), "high": float(self.high)}
