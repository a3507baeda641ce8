"""Named timing sections for ``tools/benchmark.py``'s per-iteration breakdown.

``with timed("teacher_forward"):`` costs nothing unless a :func:`collect_timings` block is active; then the
section's wall time (after a device synchronisation, so asynchronous CUDA work is attributed to the section that
queued it) is added to the collector. Sections must not nest.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch

__all__ = ["timed", "collect_timings"]

_active: Optional[Dict[str, float]] = None
_open: Optional[str] = None  # the section being timed: sections must not nest (their times would count twice)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def timed(name: str) -> Iterator[None]:
    global _open
    if _active is None:
        yield
        return
    if _open is not None:
        raise RuntimeError(f"timed section {name!r} inside {_open!r}: sections must not nest")
    _sync()
    _open, start = name, time.perf_counter()
    try:
        yield
    finally:
        _sync()
        _active[name] += time.perf_counter() - start
        _open = None


@contextmanager
def collect_timings() -> Iterator[Dict[str, float]]:
    """Sum the sections run inside the block into the yielded dict (seconds per name)."""
    global _active
    previous, _active = _active, defaultdict(float)
    try:
        yield _active
    finally:
        _active = previous
