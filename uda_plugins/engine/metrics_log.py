"""``metrics.json``, Detectron2's append-only log of one JSON object per line, made consistent across crashes.

A run killed mid-write leaves a partial last line, and a resumed run re-does the iterations after its checkpoint,
so the dead run's records of those iterations would stay beside the new ones. ``prune_metrics_log`` (called on
``--resume``) drops both, so the log of a resumed run reads like the log of an uninterrupted one;
``read_metrics_log`` reads any such file, skipping a damaged line instead of failing on it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import List

__all__ = ["read_metrics_log", "prune_metrics_log"]

logger = logging.getLogger(__name__)


def _parse(line: str):
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics_log(path: str) -> List[dict]:
    """The records of ``path`` in order; unparsable lines (a crash's partial write) are skipped."""
    with open(path) as f:
        return [r for r in (_parse(line) for line in f) if r is not None]


def prune_metrics_log(path: str, start_iter: int) -> int:
    """Keep only the complete records of iterations before ``start_iter`` (the resumed run writes the rest again);
    the file is rewritten in place, so a writer that already holds it open in append mode keeps appending to it.
    Returns the number of lines dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, "r+") as f:
        lines = f.readlines()
        kept = []
        for line in lines:
            record = _parse(line)
            if line.endswith("\n") and record is not None and record.get("iteration", -1) < start_iter:
                kept.append(line)
        dropped = len(lines) - len(kept)
        if dropped:
            f.seek(0)
            f.writelines(kept)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    if dropped:
        logger.info(f"{path}: dropped {dropped} records of iterations >= {start_iter} (re-done by the resumed run)")
    return dropped
