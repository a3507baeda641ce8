"""An offline pseudo-label bank: one hard label map per target image, on disk, rewritten during training.

DUDA's offline pseudo-labels (``update_offline_pseudo`` in parquets/DUDA ``trainers/uda_trainer.py``) and MCL's
refreshed pseudo-labels are files that the data loader reads and the training loop rewrites. The references
overwrite PNGs in place while loader workers read them, and a restart continues from whatever the files hold.
This bank keeps the same idea with three guarantees:

* **Atomic, immutable versions.** A write creates ``<root>/<key>@<version>.png`` (hard labels; soft ones: ``.npy``,
  :class:`SoftLabels`) through a temporary file and a
  rename, so a reader sees a whole file or none; a version is never modified. ``<key>`` is the image path relative
  to the dataset's common folder, without extension (sub-folders are kept, e.g. ``aachen/aachen_..._leftImg8bit``).
  Version 0 is the initial bank; a write at iteration ``t`` is version ``t + 1``.
* **A version table** (one int64 per image, -1 = no label yet) is the bank's state. It lives in shared memory, so
  data-loader workers (forked after it is created) read the current version of an image without any message;
  it goes into the checkpoint (:meth:`state_dict`), so ``--resume`` continues from the bank as it was at the
  checkpoint: files written after it are orphans and removed by :meth:`open`.
* **Deterministic reads.** A worker may have loaded an image's label for a future iteration before the main
  process rewrote it; :meth:`current_crop` re-reads it in the main process when the version a sample carries is
  not the table's. The label a step trains on is therefore always the bank after the previous step's writes,
  whatever the number of workers, and a resumed run reads what the uninterrupted run read.

Versions superseded by newer writes are deleted (by the main process, one commit later, so that no reader still
on the old table misses them) unless a retained checkpoint refers to them: the tables of the last ``keep_pinned``
checkpoints are pinned so that resuming from any of them is exact.

Distributed: every process holds the same table. :meth:`commit` is collective: the labels of the images of one
step are gathered by index, each image is written by exactly one process (its first occurrence in rank order),
all processes wait for the writes, then update their tables. ``root`` must be on a file system all processes
share (as ``OUTPUT_DIR`` for checkpoints); :meth:`open` checks that it is.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from uda_plugins.d2 import comm

from .transforms import Geometry, apply_geometry, apply_geometry_tensor

__all__ = [
    "PseudoLabelBank",
    "HardLabels",
    "SoftLabels",
    "bank_keys",
    "write_label_atomic",
    "read_label_file",
    "write_array_atomic",
    "read_array_file",
    "read_initial_label",
    "commit_in_batches",
]

logger = logging.getLogger(__name__)

_NONE = -1  # version of an image that has no label yet
INITIAL_VERSION = 0


def bank_keys(file_names: Sequence[str]) -> List[str]:
    """Unique keys of the images ``file_names``: the path relative to their common folder, without extension."""
    if not file_names:
        return []
    paths = [os.path.abspath(f) for f in file_names]
    common = os.path.commonpath([os.path.dirname(p) for p in paths])
    keys = [os.path.splitext(os.path.relpath(p, common))[0] for p in paths]
    if len(set(keys)) != len(keys):
        seen = set()
        duplicate = next(k for k in keys if k in seen or seen.add(k))
        raise ValueError(f"Two target images map to the pseudo-label key '{duplicate}' (same path but extension)")
    return keys


def write_label_atomic(path: str, label: np.ndarray) -> None:
    """Write a uint8 label map as a PNG at ``path`` through a temporary file and a rename."""
    if label.dtype != np.uint8:
        raise ValueError(f"Pseudo-labels are stored as uint8, not {label.dtype}")
    ok, encoded = cv2.imencode(".png", label)
    if not ok:
        raise OSError(f"Could not encode the pseudo-label for '{path}'")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(encoded.tobytes())
    os.replace(tmp, path)


def read_label_file(path: str) -> np.ndarray:
    label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if label is None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"Pseudo-label file '{path}' does not exist")
        raise OSError(f"Pseudo-label file '{path}' is corrupt or not a PNG")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(
            f"Pseudo-label file '{path}' must be a single-channel uint8 PNG, not {label.shape} {label.dtype}"
        )
    return label


def write_array_atomic(path: str, array: np.ndarray) -> None:
    """Write an array as ``.npy`` at ``path`` through a temporary file and a rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def read_array_file(path: str) -> np.ndarray:
    try:
        return np.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"Pseudo-label file '{path}' does not exist") from None
    except (ValueError, OSError) as e:
        raise OSError(f"Pseudo-label file '{path}' is corrupt or not a .npy array ({e})") from None


class HardLabels:
    """A map of class indices per image (uint8, 255 = ignore), stored as PNG (DUDA)."""

    extension = ".png"
    write = staticmethod(write_label_atomic)
    read = staticmethod(read_label_file)

    @staticmethod
    def crop(label: np.ndarray, geometry: Geometry) -> np.ndarray:
        return apply_geometry(label, geometry, is_label=True)


class SoftLabels:
    """Class probabilities per image, (C, h, w) float16 at any resolution covering the image, stored as ``.npy``
    (MCL's soft pseudo-labels); a crop is resized bilinearly."""

    extension = ".npy"
    write = staticmethod(write_array_atomic)
    read = staticmethod(read_array_file)

    @staticmethod
    def crop(probs: np.ndarray, geometry: Geometry) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(probs)).float()
        return apply_geometry_tensor(tensor, geometry, mode="bilinear").to(torch.float16).numpy()


def read_initial_label(folder: str, key: str) -> np.ndarray:
    """An initial pseudo-label of the image with bank key ``key`` from a folder of PNGs named either like the key
    (``<folder>/<key>.png``, sub-folders kept) or like the image file (``<folder>/<file name>.png``)."""
    candidates = [os.path.join(folder, key + ".png"), os.path.join(folder, os.path.basename(key) + ".png")]
    for path in candidates:
        if os.path.exists(path):
            return read_label_file(path)
    raise FileNotFoundError(f"No initial pseudo-label for '{key}': tried {' and '.join(candidates)}")


def commit_in_batches(
    bank: "PseudoLabelBank", batches: Iterator[Sequence[Tuple[int, np.ndarray]]], batch_size: int, iteration: int
) -> None:
    """Rewrite the whole bank, one collective :meth:`PseudoLabelBank.commit` per batch of this process's shard
    (``batches``: the new labels of each batch of a sharded loader with ``batch_size`` images per batch). Every
    process makes the same number of commits, though its shard may be one image shorter."""
    per_rank = -(-len(bank) // comm.get_world_size())
    for _ in range(-(-per_rank // batch_size)):
        bank.commit(next(batches, []), iteration)
    if comm.is_main_process():
        bank.delete_superseded()  # the last batch's old versions too: no commit may follow for a long time


class PseudoLabelBank:
    """The bank of one target dataset.

    Args:
        root: the bank's folder (e.g. ``OUTPUT_DIR/pseudo_label_bank/<dataset>``).
        file_names: the dataset's image files, in dataset order; image ``i`` of the bank is ``file_names[i]``.
        keep_pinned: how many of the newest checkpoints' tables stay restorable.
        codec: :class:`HardLabels` (class maps as PNG) or :class:`SoftLabels` (probabilities as ``.npy``).
    """

    def __init__(self, root: str, file_names: Sequence[str], keep_pinned: int = 2, codec=HardLabels) -> None:
        self.root = root
        self.codec = codec
        self.keys = bank_keys(file_names)
        self.keep_pinned = max(1, int(keep_pinned))
        self.versions = torch.full((len(self.keys),), _NONE, dtype=torch.int64).share_memory_()
        self._pinned: List[torch.Tensor] = []
        self._superseded: List[Tuple[int, int]] = []  # (index, version) to delete at the next commit
        self.stale_reads = 0  # main-process re-reads (see current_crop)

    def __len__(self) -> int:
        return len(self.keys)

    # ------------------------------------------------------------------------------------------ files
    def path(self, index: int, version: int) -> str:
        return os.path.join(self.root, f"{self.keys[index]}@{version}{self.codec.extension}")

    @property
    def initialized(self) -> bool:
        return bool((self.versions >= 0).all())

    def read(self, index: int) -> Tuple[np.ndarray, int]:
        """The current label of image ``index`` (at the resolution it was written) and its version. Safe in
        data-loader workers: a version deleted under the reader is retried with the newer table entry."""
        for attempt in range(50):
            version = int(self.versions[index])
            if version < 0:
                raise RuntimeError(f"The pseudo-label bank '{self.root}' has no label for '{self.keys[index]}' yet")
            try:
                return self.codec.read(self.path(index, version)), version
            except FileNotFoundError:
                if int(self.versions[index]) == version and attempt >= 10:
                    raise
                time.sleep(0.01)
        raise FileNotFoundError(self.path(index, int(self.versions[index])))

    def read_crop(self, index: int, geometry: Geometry) -> Tuple[np.ndarray, int]:
        """The current label of image ``index`` with a sample's recorded resize/crop/flip replayed (nearest)."""
        label, version = self.read(index)
        return self.codec.crop(label, geometry), version

    def current_crop(self, index: int, geometry: Geometry, label: Optional[np.ndarray], version: int) -> np.ndarray:
        """``label`` (read by a worker at ``version``) if that is still the current version, else the current one
        read now (counted in ``stale_reads``)."""
        if label is not None and version == int(self.versions[index]):
            return label
        self.stale_reads += 1
        return self.read_crop(index, geometry)[0]

    def crops_of(self, samples: Sequence[dict]) -> List[np.ndarray]:
        """The current labels of a training batch's samples of this bank's dataset (:meth:`current_crop` of the
        ``pseudo_label`` each sample's loader worker read)."""
        crops = []
        for d in samples:
            worker_label = d.get("pseudo_label")
            crops.append(
                self.current_crop(
                    d["dataset_index"],
                    Geometry.from_dict(d["geometry"]),
                    None if worker_label is None else worker_label.numpy(),
                    d.get("pseudo_label_version", -1),
                )
            )
        return crops

    # ------------------------------------------------------------------------------------- lifecycle
    def open(self) -> None:
        """Before training: check that all processes share ``root`` and remove the files the table (restored from
        a checkpoint, or empty) and its pins do not refer to — those of a run that went on past the checkpoint."""
        os.makedirs(self.root, exist_ok=True)
        marker = os.path.join(self.root, ".shared_by_all_processes")
        if comm.is_main_process():
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
        comm.synchronize()
        if not os.path.exists(marker):
            raise RuntimeError(
                f"The pseudo-label bank folder '{self.root}' is not visible to process {comm.get_rank()}: "
                "OUTPUT_DIR must be on a file system every process shares"
            )
        if comm.is_main_process():
            removed = self._remove_unreferenced()
            if removed:
                logger.info("Pseudo-label bank %s: removed %d file(s) not in the restored state", self.root, removed)
            missing = [self.path(i, int(v)) for i, v in enumerate(self.versions.tolist()) if v >= 0]
            missing = [p for p in missing if not os.path.exists(p)]
            if missing:
                raise FileNotFoundError(
                    f"The pseudo-label bank of this checkpoint refers to {len(missing)} missing file(s), e.g. "
                    f"'{missing[0]}': it was resumed from a checkpoint older than the {self.keep_pinned} newest, "
                    "whose bank states are the only ones kept (SOLVER.MAX_CHECKPOINTS_TO_KEEP)"
                )
        comm.synchronize()

    def _referenced(self) -> set:
        referenced = set()
        for table in [self.versions] + self._pinned:
            referenced.update((i, int(v)) for i, v in enumerate(table.tolist()) if v >= 0)
        return referenced

    def _remove_unreferenced(self) -> int:
        referenced = {self.path(i, v) for i, v in self._referenced()}
        removed = 0
        for folder, _, files in os.walk(self.root):
            for name in files:
                path = os.path.join(folder, name)
                ext = self.codec.extension
                if (name.endswith(ext) and "@" in name or f"{ext}.tmp" in name) and path not in referenced:
                    os.remove(path)
                    removed += 1
        return removed

    def initialize(self, labels: Iterable[Tuple[int, np.ndarray]]) -> None:
        """Write version 0 of this process's images from ``labels`` (``(index, uint8 map)`` pairs), then mark the
        whole bank as initialised. Collective: together the processes' pairs must cover the bank."""
        for index, label in labels:
            self.codec.write(self.path(int(index), INITIAL_VERSION), label)
        comm.synchronize()
        self.versions.fill_(INITIAL_VERSION)

    def commit(self, labels: Sequence[Tuple[int, np.ndarray]], iteration: int) -> int:
        """Write the new labels ``(index, uint8 map)`` of this process's images of the step of ``iteration``
        (version ``iteration + 1``). Collective; an image several processes (or one process twice) hold is
        written once, by its first holder in rank order. Returns the number of files this process wrote."""
        version = int(iteration) + 1
        local = [int(i) for i, _ in labels]
        everyone = comm.all_gather(local) if comm.get_world_size() > 1 else [local]
        rank = comm.get_rank()
        owner: Dict[int, Tuple[int, int]] = {}
        for r, indices in enumerate(everyone):
            for slot, index in enumerate(indices):
                owner.setdefault(index, (r, slot))
        written = 0
        for slot, (index, label) in enumerate(labels):
            if owner[int(index)] == (rank, slot):
                self.codec.write(self.path(int(index), version), label)
                written += 1
        comm.synchronize()  # every write is on disk before any process reads the new table
        if comm.is_main_process():
            self.delete_superseded()
        for index in owner:
            previous = int(self.versions[index])
            self.versions[index] = version
            if comm.is_main_process() and previous >= 0:
                self._superseded.append((index, previous))
        return written

    def _still_referenced(self, index: int, version: int) -> bool:
        return any(int(table[index]) == version for table in [self.versions] + self._pinned)

    def delete_superseded(self) -> None:
        """Main process: delete the files earlier commits superseded that no pinned table refers to. A commit does
        it for the previous commit's; a reader that still had an old table entry retries with the new one."""
        # Only the superseded entries are checked (not a set of the whole bank built every step).
        for index, version in self._superseded:
            if not self._still_referenced(index, version):
                try:
                    os.remove(self.path(index, version))
                except FileNotFoundError:
                    pass
        self._superseded = []

    # ------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Called when a checkpoint is saved: pins this table (its files are kept while it is among the newest
        ``keep_pinned``) and returns it with the pins."""
        pinned = self._pinned + [self.versions.clone()]
        for dropped in pinned[: -self.keep_pinned]:  # its files go at the next commit unless still referenced
            self._superseded += [(i, int(v)) for i, v in enumerate(dropped.tolist()) if v >= 0]
        self._pinned = pinned[-self.keep_pinned :]
        return {"versions": self.versions.clone(), "pinned": torch.stack(self._pinned)}

    def load_state_dict(self, state: dict) -> None:
        versions = state["versions"]
        if versions.shape != self.versions.shape:
            raise ValueError(
                f"The checkpoint's pseudo-label bank has {versions.numel()} images, the dataset {len(self)}: "
                "was DATASETS.TARGET_TRAIN changed?"
            )
        self.versions.copy_(versions)  # in place: data-loader workers share this tensor
        self._pinned = [t.clone() for t in state.get("pinned", torch.zeros(0, len(self)))]
        self._superseded = []
