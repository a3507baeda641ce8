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


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def timed(name: str) -> Iterator[None]:
    if _active is None:
        yield
        return
    _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        _active[name] += time.perf_counter() - start


@contextmanager
def collect_timings() -> Iterator[Dict[str, float]]:
    """Sum the sections run inside the block into the yielded dict (seconds per name)."""
    global _active
    previous, _active = _active, defaultdict(float)
    try:
        yield _active
    finally:
        _active = previous
