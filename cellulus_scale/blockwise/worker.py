"""Per-worker state of a run: a cache that lives as long as the worker process (one model and one
opened input per worker, not per block)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_CACHE: dict[Any, Any] = {}


def cached(key: Any, make: Callable[[], Any]) -> Any:
    """``make()``, computed once per worker process for each ``key``."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]
