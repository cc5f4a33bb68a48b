"""The compact form of a block's OCEs that a run keeps between its stages (numpy in, numpy out).

Later stages need, per pixel, only its offset (to within a small fraction of the mean-shift
bandwidth) and whether its std lies below the video's threshold. So each pixel is stored as
``dims + 1`` bytes: every offset component in fixed point, ``round(offset / step)`` clipped to
+-127 and stored plus 128, with ``step`` a fraction of the diameter, and a std code. Without a
given threshold the code is the pixel's bin among ``edges`` (the statistics' histogram edges)
divided by ``bins_per_code`` (at most 255), so that every threshold on a multiple of
``bins_per_code`` bins decides foreground exactly; with a given threshold it is 0 below it and
1 above. Four bytes per 2D pixel instead of twelve, and they compress well (README, "Data
layout").
"""

from __future__ import annotations

import numpy as np

OFFSET_ZERO = 128  # the stored value of a zero offset
OFFSET_LIMIT = 127  # offsets are clipped to +-OFFSET_LIMIT steps
CODE_MAX = 255


def std_codes(
    std: np.ndarray, edges: np.ndarray, bins_per_code: int, threshold: float | None
) -> np.ndarray:
    """The std code of every pixel (uint8): its histogram bin // ``bins_per_code`` (at most
    255) where ``threshold`` is None, else 0 below ``threshold`` and 1 from it up."""
    if threshold is not None:
        return (std >= threshold).astype(np.uint8)
    # float32 edges: the std is float32, and the test std < edge is then made as before
    fine = np.searchsorted(edges.astype(np.float32), std.ravel(), side="right") - 1
    return np.minimum(fine // bins_per_code, CODE_MAX).astype(np.uint8).reshape(std.shape)


def encode(
    offsets: np.ndarray,
    std: np.ndarray,
    step: float,
    edges: np.ndarray,
    bins_per_code: int,
    threshold: float | None,
) -> np.ndarray:
    """(dims + 1, *spatial) uint8: the fixed-point offsets, then the std codes."""
    fixed = np.clip(np.rint(offsets / step), -OFFSET_LIMIT, OFFSET_LIMIT) + OFFSET_ZERO
    codes = std_codes(std, edges, bins_per_code, threshold)
    return np.concatenate([fixed.astype(np.uint8), codes[None]])


def decode(values: np.ndarray, step: float, code_limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets as float64 (dims, *spatial), foreground: code < ``code_limit``) of
    :func:`encode`'s output."""
    offsets = (values[:-1].astype(np.float64) - OFFSET_ZERO) * step
    return offsets, values[-1] < code_limit
