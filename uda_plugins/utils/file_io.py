"""Atomic file writes: a reader (another rank, a data-loader worker, a resumed run) never sees half a file."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator, Union

import numpy as np
from PIL import Image

__all__ = ["atomic_open", "atomic_write_png", "atomic_write_text"]


@contextmanager
def atomic_open(path: Union[str, os.PathLike], mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on a clean exit it is flushed, fsynced and renamed over ``path``
    (``os.replace`` is atomic on POSIX); on an exception it is removed and ``path`` is untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_png(path: Union[str, os.PathLike], array: np.ndarray) -> None:
    """Write a uint8 (L / RGB) or uint16 (I;16) array as a PNG, atomically."""
    if array.dtype == np.uint16:
        image = Image.fromarray(array, mode="I;16") if array.ndim == 2 else Image.fromarray(array)
    else:
        image = Image.fromarray(np.ascontiguousarray(array))
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)
