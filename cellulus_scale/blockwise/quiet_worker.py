"""Preloaded into the embedded cluster's worker processes: they ignore SIGINT, so that a
Ctrl-C in the terminal (sent to the whole process group) reaches only the command, which then
stops the cluster and prints one line, instead of every worker printing a traceback."""

from __future__ import annotations

import signal
from typing import Any


def dask_setup(worker: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
