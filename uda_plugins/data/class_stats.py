"""Per-image class pixel counts of a labelled dataset, cached once in a JSON file: what rare-class sampling needs.

This is the class-statistics step of lhoyer/MIC ``seg/tools/convert_datasets/gta.py`` (``sample_class_stats.json``,
``samples_with_class.json``), done for any registered dataset instead of inside one converter:

* **What is counted:** the pixels of every class ``0..num_classes-1`` in each prepared label file
  (``sem_seg_file_name``), **at the resolution the file is stored at** (GTA5: the original 1914x1052), as the
  reference counts them while converting the original labels. The ignore label is not counted. A value that is
  neither a class nor the ignore label stops with the file's name, as in the mapper.
* **Where the cache goes:** ``class_stats.<dataset name>.json`` beside the dataset's label folder, i.e. in the
  parent of the deepest folder holding all its label files (GTA5: ``gta5/``, as the reference's data root;
  Cityscapes: ``cityscapes/gtFine/``). Where that is not writable, in ``$XDG_CACHE_HOME/uda_plugins/class_stats``
  (``~/.cache/...``), under a name that also hashes the label folder. ``stats_dir`` replaces both.
* **When it is reused:** only if it was written for the same dataset name, number of classes and exact set of
  label files (paths relative to the label folder, so a moved dataset keeps its cache). Anything else is *stale*
  and recomputed. Labels re-prepared in place under the same names are not detected: recompute with
  ``tools/compute_class_stats.py --force``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .datasets.common import read_label
from .labels import IGNORE_LABEL, check_label_values

__all__ = [
    "CACHE_VERSION",
    "StaleCache",
    "label_files",
    "cache_candidates",
    "count_class_pixels",
    "compute_class_pixels",
    "load_class_stats",
    "save_class_stats",
    "ensure_class_stats",
]

logger = logging.getLogger(__name__)

# Bump when the file format or what is counted changes, so old caches are recomputed.
CACHE_VERSION = 1
_FORMAT = "uda_plugins.class_stats"


class StaleCache(ValueError):
    """A class-statistics cache that does not describe the dataset it was found for."""


def label_files(dicts: Sequence[dict], dataset_name: str = "") -> List[str]:
    """The ``sem_seg_file_name`` of every dict; an unlabelled dict fails (rare-class sampling needs labels)."""
    files = []
    for d in dicts:
        if "sem_seg_file_name" not in d:
            raise KeyError(
                f"Image '{d.get('file_name')}' of dataset '{dataset_name}' has no label ('sem_seg_file_name'); "
                f"class statistics need a labelled dataset"
            )
        files.append(d["sem_seg_file_name"])
    return files


def _label_root(files: Sequence[str]) -> str:
    # The deepest folder holding every label file: relative paths below it identify the files wherever the
    # dataset is mounted.
    return os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])


def _user_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "uda_plugins", "class_stats")


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def cache_candidates(dataset_name: str, files: Sequence[str], stats_dir: str = "") -> List[str]:
    """Where the cache of ``dataset_name`` is looked for, in order; the first writable one is where it is written.
    With ``stats_dir`` only there; else beside the label folder, then the user cache folder."""
    root = _label_root(files)
    # Outside the dataset folder, the name also hashes the label folder: two datasets registered under one name
    # (e.g. another $UDA_DATASETS) do not overwrite each other's cache.
    hashed = f"class_stats.{_safe_name(dataset_name)}.{hashlib.sha1(root.encode()).hexdigest()[:10]}.json"
    if stats_dir:
        return [os.path.join(stats_dir, hashed)]
    beside = os.path.dirname(root) or root
    return [
        os.path.join(beside, f"class_stats.{_safe_name(dataset_name)}.json"),
        os.path.join(_user_cache_dir(), hashed),
    ]


def count_class_pixels(path: str, num_classes: int, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """Pixels of each class ``0..num_classes-1`` in the label file ``path`` at its stored resolution (int64)."""
    label = read_label(path)
    check_label_values(label, num_classes, path, ignore_label)
    counts = np.bincount(label.reshape(-1).astype(np.int64, copy=False), minlength=max(num_classes, 256))
    return counts[:num_classes].astype(np.int64)


def compute_class_pixels(
    files: Sequence[str],
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    jobs: int = 1,
    progress: bool = True,
    desc: str = "class statistics",
) -> np.ndarray:
    """An (N, num_classes) int64 array: row i = :func:`count_class_pixels` of ``files[i]``. ``jobs`` threads read
    the files (PNG decoding releases the GIL; threads, unlike processes, are safe in a training process)."""
    from tqdm import tqdm

    out = np.zeros((len(files), num_classes), dtype=np.int64)
    bar = tqdm(total=len(files), desc=desc, unit="file", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, int(jobs))) as pool:
        for i, counts in enumerate(pool.map(lambda f: count_class_pixels(f, num_classes, ignore_label), files)):
            out[i] = counts
            bar.update(1)
    bar.close()
    return out


def save_class_stats(path: str, dataset_name: str, files: Sequence[str], pixels: np.ndarray) -> None:
    """Write the cache atomically (temp file + rename: a reader never sees half a file)."""
    from uda_plugins.utils.file_io import atomic_write_text

    root = _label_root(files)
    payload = {
        "format": _FORMAT,
        "version": CACHE_VERSION,
        "dataset": dataset_name,
        "num_classes": int(pixels.shape[1]),
        "counted_at": "stored label resolution",
        "files": [os.path.relpath(os.path.abspath(f), root) for f in files],
        "pixels": pixels.tolist(),
    }
    atomic_write_text(path, json.dumps(payload, separators=(",", ":")))


def load_class_stats(path: str, dataset_name: str, files: Sequence[str], num_classes: int) -> Optional[np.ndarray]:
    """The (N, num_classes) counts of ``files`` (in their order) from the cache at ``path``; None when there is no
    such file. A cache written for another dataset, number of classes or file list raises :class:`StaleCache`."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, ValueError) as e:
        raise StaleCache(f"unreadable ({e})") from None
    if payload.get("format") != _FORMAT or payload.get("version") != CACHE_VERSION:
        raise StaleCache(f"format {payload.get('format')} v{payload.get('version')}, expected v{CACHE_VERSION}")
    if payload.get("dataset") != dataset_name:
        raise StaleCache(f"written for dataset '{payload.get('dataset')}'")
    if payload.get("num_classes") != num_classes:
        raise StaleCache(f"written for {payload.get('num_classes')} classes, not {num_classes}")
    root = _label_root(files)
    rows = {name: i for i, name in enumerate(payload["files"])}
    wanted = [os.path.relpath(os.path.abspath(f), root) for f in files]
    if len(payload["files"]) != len(wanted) or any(w not in rows for w in wanted):
        missing = sum(w not in rows for w in wanted)
        raise StaleCache(
            f"lists {len(payload['files'])} label files, the dataset {len(wanted)} ({missing} not in the cache)"
        )
    pixels = np.asarray(payload["pixels"], dtype=np.int64).reshape(len(payload["files"]), num_classes)
    return pixels[[rows[w] for w in wanted]]


def _writable(path: str) -> bool:
    directory = os.path.dirname(path)
    probe = directory
    while not os.path.isdir(probe):  # the folder may not exist yet (user cache): test its nearest ancestor
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent
    return os.access(probe, os.W_OK | os.X_OK)


def ensure_class_stats(
    dataset_name: str,
    dicts: Sequence[dict],
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    *,
    stats_dir: str = "",
    jobs: int = 1,
    force: bool = False,
    progress: bool = True,
) -> Tuple[np.ndarray, str]:
    """The (len(dicts), num_classes) class pixel counts of a dataset and the cache file they came from or went to.

    A valid cache is read; a missing or stale one (see the module doc) is computed with ``jobs`` reader threads
    and written to the first writable candidate place. ``force`` recomputes even a valid cache."""
    files = label_files(dicts, dataset_name)
    candidates = cache_candidates(dataset_name, files, stats_dir)
    if not force:
        for path in candidates:
            try:
                pixels = load_class_stats(path, dataset_name, files, num_classes)
            except StaleCache as e:
                logger.warning("Class statistics '%s' are stale (%s); they will be recomputed", path, e)
                continue
            if pixels is not None:
                return pixels, path
    target = next((p for p in candidates if _writable(p)), None)
    if target is None:
        raise PermissionError(f"No writable place for the class statistics of '{dataset_name}': tried {candidates}")
    logger.info(
        "Counting the class pixels of %d label files of '%s' (once; cached in %s)", len(files), dataset_name, target
    )
    pixels = compute_class_pixels(files, num_classes, ignore_label, jobs, progress, desc=dataset_name)
    save_class_stats(target, dataset_name, files, pixels)
    return pixels, target
