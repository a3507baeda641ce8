"""Detectron2's ``setup_logger`` and ``seed_all_rng``."""

from __future__ import annotations

import functools
import logging
import os
import random
import sys
from datetime import datetime
from typing import Optional

import numpy as np
import torch

__all__ = ["setup_logger", "seed_all_rng"]

_FORMAT = "[%(asctime)s] %(name)s %(levelname)s: %(message)s"
_SHORT_FORMAT = "[%(asctime)s %(name)s]: %(message)s"


@functools.lru_cache()  # calling it twice with the same arguments must not add handlers twice
def setup_logger(
    output: Optional[str] = None,
    distributed_rank: int = 0,
    *,
    color: bool = True,
    name: str = "detectron2",
    abbrev_name: Optional[str] = None,
    enable_propagation: bool = False,
    configure_stdout: bool = True,
) -> logging.Logger:
    """Log ``name`` and its children to stdout (rank 0) and to ``output`` (a file, or ``output/log.txt``;
    other ranks write ``log.txt.rank{N}``)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = enable_propagation
    if configure_stdout and distributed_rank == 0:
        ch = logging.StreamHandler(stream=sys.stdout)
        ch.setLevel(logging.DEBUG)
        ch.setFormatter(logging.Formatter(_SHORT_FORMAT, datefmt="%m/%d %H:%M:%S"))
        logger.addHandler(ch)
    if output is not None:
        filename = output if output.endswith((".txt", ".log")) else os.path.join(output, "log.txt")
        if distributed_rank > 0:
            filename = filename + ".rank{}".format(distributed_rank)
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        fh = logging.StreamHandler(_cached_log_stream(filename))
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter(_FORMAT, datefmt="%m/%d %H:%M:%S"))
        logger.addHandler(fh)
    return logger


@functools.lru_cache(maxsize=None)
def _cached_log_stream(filename: str):
    return open(filename, "a", buffering=1)


def seed_all_rng(seed: Optional[int] = None) -> None:
    """Seed python, numpy and torch; ``None`` draws a fresh seed from the pid and the clock."""
    if seed is None:
        seed = os.getpid() + int(datetime.now().strftime("%S%f")) + int.from_bytes(os.urandom(2), "big")
        logging.getLogger(__name__).info("Using a generated random seed {}".format(seed))
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
