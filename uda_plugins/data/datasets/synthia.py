"""SYNTHIA-RAND-CITYSCAPES (Ros et al. 2016): the second standard synthetic source, 9,400 rendered frames.

Layout (``<root>`` = ``$UDA_DATASETS/synthia``)::

    RGB/XXXXXXX.png                        1280x760 RGB frames
    GT/LABELS/XXXXXXX.png                  as downloaded: 16-bit 3-channel PNG, the class id in the first (R) channel
    GT/LABELS/XXXXXXX_labelTrainIds.png    19 Cityscapes trainIds   (tools/prepare_synthia.py)

Pillow reads a 16-bit colour PNG as 8-bit RGB (the high byte only, so every class id < 256 becomes 0), which is
why the raw labels are read with OpenCV, as DAFormer's converter does
(lhoyer/DAFormer@e6f6e041e7477b642106c134c1715fc934ccd210:tools/convert_datasets/synthia.py:
``cv2.imread(file, cv2.IMREAD_UNCHANGED)[:, :, -1]``, the R channel in OpenCV's BGR order; ADVENT-style loaders
read the same channel as ``[:, :, 0]`` through FreeImage's RGB order).

The SYNTHIA id -> trainId table is DAFormer's (same file). SYNTHIA has no terrain, truck or train pixels; the
table still maps their SYNTHIA ids (16, 18, 20) as DAFormer does, which changes nothing on the released data.
SYNTHIA results are reported as mIoU16 / mIoU13 over the 19-class predictions; the Cityscapes target splits carry
those subsets in their metadata, so the source needs none. The whole set is the training split (``synthia_train``).
"""

from __future__ import annotations

import glob
import os
from typing import List

import cv2
import numpy as np

from uda_plugins.data.labels import CITYSCAPES_19, build_lut

from .common import (
    datasets_root,
    image_label_dicts,
    raw_label_files,
    register_sem_seg,
    require_dir,
    write_prepared_labels,
)

__all__ = [
    "LABEL_SUFFIX",
    "synthia_id_to_trainid",
    "read_synthia_label",
    "load_synthia_semseg",
    "prepare_synthia",
    "register_synthia",
    "default_root",
]

LABEL_SUFFIX = "_labelTrainIds.png"
PREPARE_COMMAND = "python tools/prepare_synthia.py"

# lhoyer/DAFormer@e6f6e041e7477b642106c134c1715fc934ccd210:tools/convert_datasets/synthia.py (``id_to_trainid``)
_SYNTHIA_TO_TRAINID = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    16: 9,  # terrain: not present in SYNTHIA
    1: 10,
    10: 11,
    17: 12,
    8: 13,
    18: 14,  # truck: not present in SYNTHIA
    19: 15,
    20: 16,  # train: not present in SYNTHIA
    12: 17,
    11: 18,
}
# SYNTHIA's class ids are 0..22 (the README's table, quoted in
# visinf/da-sac@302819ee57ee5e91b8e162d92f7d2087a84feca7:tools/id_mappers.py); the unmapped ones, void (0),
# parking-slot (13), road-work (14) and lane-marking (22), are ignored.
_SYNTHIA_IDS = tuple(range(23))


def synthia_id_to_trainid() -> np.ndarray:
    """SYNTHIA class ids -> 19 Cityscapes trainIds; ids outside 0..22 are unknown."""
    return build_lut(_SYNTHIA_TO_TRAINID, known_ignored=_SYNTHIA_IDS)


def read_synthia_label(path: str) -> np.ndarray:
    """The class-id channel (uint16, HxW) of a raw SYNTHIA ``GT/LABELS`` file; fails naming the file when it is
    missing, unreadable or not a 16-bit 3-channel PNG."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Label file '{path}' does not exist")
    raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise OSError(f"Label file '{path}' is corrupt or not an image")
    if raw.dtype != np.uint16 or raw.ndim != 3 or raw.shape[2] != 3:
        raise ValueError(
            f"Label file '{path}' is not a raw SYNTHIA label: expected a 16-bit 3-channel PNG, got {raw.dtype} "
            f"with shape {raw.shape}"
        )
    return raw[:, :, 2]  # OpenCV returns BGR: index 2 is the PNG's first (R) channel, the class id


def _image_files(root: str) -> List[str]:
    require_dir(root, "SYNTHIA dataset root")
    image_dir = require_dir(os.path.join(root, "RGB"), "SYNTHIA image")
    files = sorted(glob.glob(os.path.join(image_dir, "*.png")))
    if not files:
        raise FileNotFoundError(f"No '*.png' images in '{image_dir}'")
    return files


def _stem(image_file: str) -> str:
    return os.path.splitext(os.path.basename(image_file))[0]


def _label_file(root: str, image_file: str, suffix: str = ".png") -> str:
    return os.path.join(root, "GT", "LABELS", _stem(image_file) + suffix)


def load_synthia_semseg(root: str) -> List[dict]:
    """One dict per frame (``sem_seg_file_name`` = the prepared trainId file, ``raw_sem_seg_file_name`` = the label as
    downloaded, which a release reading it directly sees, ``image_id`` = the file stem)."""
    image_files = _image_files(root)
    require_dir(os.path.join(root, "GT", "LABELS"), "SYNTHIA label")
    dicts = image_label_dicts(
        image_files, lambda f: _label_file(root, f, LABEL_SUFFIX), _stem, f"run: {PREPARE_COMMAND} --root {root}"
    )
    return [dict(d, raw_sem_seg_file_name=_label_file(root, d["file_name"])) for d in dicts]


def prepare_synthia(root: str, skip_existing: bool = True) -> int:
    """Write ``GT/LABELS/XXXXXXX_labelTrainIds.png`` for every frame. Returns the number of files written."""
    image_files = _image_files(root)
    require_dir(os.path.join(root, "GT", "LABELS"), "SYNTHIA label")
    raw_files = raw_label_files(image_files, lambda f: _label_file(root, f))
    return write_prepared_labels(
        raw_files, ".png", {LABEL_SUFFIX: synthia_id_to_trainid()}, "synthia", skip_existing, read=read_synthia_label
    )


def register_synthia(root: str, name_prefix: str = "synthia") -> None:
    """``<prefix>_train`` (19 Cityscapes classes), and ``<prefix>_ilm_assl_ids_train``, the same frames with
    ILM-ASSL's label ids (16 contiguous ids against a 19-class model: its released bug, to reproduce its SYNTHIA
    runs); nothing is read until used."""
    register_sem_seg(f"{name_prefix}_train", lambda: load_synthia_semseg(root), CITYSCAPES_19, dataset_root=root)

    def ilm_assl_ids() -> List[dict]:
        return [dict(d, label_map="ilm_assl_synthia") for d in load_synthia_semseg(root)]

    register_sem_seg(f"{name_prefix}_ilm_assl_ids_train", ilm_assl_ids, CITYSCAPES_19, dataset_root=root)


def default_root() -> str:
    return os.path.join(datasets_root(), "synthia")
