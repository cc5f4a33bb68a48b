"""Per-worker state of a run: a cache that lives as long as the worker process (one model and one
opened input per worker, not per block), and the worker's share of its host's cores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cellulus_scale.blockwise.plan import Plan

_CACHE: dict[Any, Any] = {}


def cached(key: Any, make: Callable[[], Any]) -> Any:
    """``make()``, computed once per worker process for each ``key``."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def worker_host() -> str:
    """The host of the Dask worker running this task ("" outside a worker)."""
    try:
        from distributed import get_worker

        return get_worker().address.rsplit(":", 1)[0]
    except (ImportError, ValueError):
        return ""


def host_threads(plan: Plan) -> int:
    """Worker threads on this worker's host (0 where unknown), so that a task can size torch's
    thread pool to its share of the host's cores."""
    return plan.torch_threads.get(worker_host(), 0)
