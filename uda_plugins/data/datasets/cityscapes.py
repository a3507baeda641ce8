"""Cityscapes, and any dataset in its layout (IDD, the embedded synthetic pair).

Layout (``<root>`` = ``$UDA_DATASETS/cityscapes``)::

    leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png
    gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png        (as downloaded)
    gtFine/{train,val}/<city>/<stem>_gtFine_labelTrainIds.png   (19 classes; tools/prepare_cityscapes.py)
    gtFine/{train,val}/<city>/<stem>_gtFine_label7Ids.png       (MTAF 7 classes; tools/prepare_cityscapes.py)

labelIds -> trainIds uses cityscapesscripts' label table (``uda_plugins.data.labels``).
"""

from __future__ import annotations

import glob
import os
from typing import Dict, List, Sequence

import numpy as np

from uda_plugins.data.labels import CITYSCAPES_19, MTAF_7, cityscapes_labelid_to_mtaf7, cityscapes_labelid_to_trainid

from .common import (
    datasets_root,
    image_label_dicts,
    raw_label_files,
    register_sem_seg,
    require_dir,
    write_prepared_labels,
)

__all__ = [
    "LABEL_SUFFIXES",
    "load_cityscapes_layout",
    "prepare_cityscapes_layout",
    "load_cityscapes_semseg",
    "prepare_cityscapes",
    "register_cityscapes",
    "default_root",
]

IMAGE_SUFFIX = "_leftImg8bit.png"
RAW_LABEL_SUFFIX = "_gtFine_labelIds.png"
# class set name -> suffix of the prepared label files
LABEL_SUFFIXES = {CITYSCAPES_19.name: "_gtFine_labelTrainIds.png", MTAF_7.name: "_gtFine_label7Ids.png"}


def _image_files(root: str, split: str, dataset: str) -> List[str]:
    require_dir(root, f"{dataset} dataset root")
    image_dir = require_dir(os.path.join(root, "leftImg8bit", split), f"{dataset} image ({split})")
    files = sorted(glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX)))
    if not files:
        raise FileNotFoundError(f"No '*{IMAGE_SUFFIX}' images under '{image_dir}/<city>/'")
    return files


def _label_file_of(root: str, split: str, suffix: str):
    def label_file(image_file: str) -> str:
        city = os.path.basename(os.path.dirname(image_file))
        stem = os.path.basename(image_file)[: -len(IMAGE_SUFFIX)]
        return os.path.join(root, "gtFine", split, city, stem + suffix)

    return label_file


def _image_id(image_file: str) -> str:
    return os.path.basename(os.path.dirname(image_file)) + "/" + os.path.basename(image_file)[: -len(IMAGE_SUFFIX)]


def load_cityscapes_layout(root: str, split: str, label_suffix: str, dataset: str, prepare_command: str) -> List[dict]:
    """The dicts of a split in the Cityscapes layout; ``dataset`` and ``prepare_command`` word the errors."""
    image_files = _image_files(root, split, dataset)
    require_dir(os.path.join(root, "gtFine", split), f"{dataset} label ({split})")
    return image_label_dicts(
        image_files, _label_file_of(root, split, label_suffix), _image_id, f"run: {prepare_command} --root {root}"
    )


def prepare_cityscapes_layout(
    root: str,
    splits: Sequence[str],
    raw_suffix: str,
    luts: Dict[str, np.ndarray],
    dataset: str,
    raw_hint: str = "",
    skip_existing: bool = True,
) -> int:
    """Write the prepared label files (suffix -> LUT in ``luts``) next to every ``<stem><raw_suffix>``."""
    written = 0
    for split in splits:
        require_dir(os.path.join(root, "gtFine", split), f"{dataset} label ({split})")
        raw = raw_label_files(_image_files(root, split, dataset), _label_file_of(root, split, raw_suffix), raw_hint)
        written += write_prepared_labels(raw, raw_suffix, luts, f"{dataset.lower()} {split}", skip_existing)
    return written


def load_cityscapes_semseg(root: str, split: str, label_suffix: str = LABEL_SUFFIXES[CITYSCAPES_19.name]) -> List[dict]:
    """One dict per image: ``file_name``, ``sem_seg_file_name``, ``height``, ``width``, ``image_id``.
    Every image must have its prepared label file (the error names both and the command that makes it)."""
    return load_cityscapes_layout(root, split, label_suffix, "Cityscapes", "python tools/prepare_cityscapes.py")


def prepare_cityscapes(root: str, splits: Sequence[str] = ("train", "val"), skip_existing: bool = True) -> int:
    """Write the 19-class and 7-class label files next to every ``*_gtFine_labelIds.png``."""
    luts = {
        LABEL_SUFFIXES[CITYSCAPES_19.name]: cityscapes_labelid_to_trainid(),
        LABEL_SUFFIXES[MTAF_7.name]: cityscapes_labelid_to_mtaf7(),
    }
    return prepare_cityscapes_layout(root, splits, RAW_LABEL_SUFFIX, luts, "Cityscapes", skip_existing=skip_existing)


def register_cityscapes(root: str, name_prefix: str = "cityscapes") -> None:
    """``<prefix>_{train,val}`` (19 classes) and ``<prefix>_7cls_{train,val}`` (MTAF 7 classes)."""
    for split in ("train", "val"):
        register_sem_seg(
            f"{name_prefix}_{split}",
            lambda split=split: load_cityscapes_semseg(root, split, LABEL_SUFFIXES[CITYSCAPES_19.name]),
            CITYSCAPES_19,
            eval_subsets=("synthia16", "synthia13"),
            dataset_root=root,
        )
        register_sem_seg(
            f"{name_prefix}_7cls_{split}",
            lambda split=split: load_cityscapes_semseg(root, split, LABEL_SUFFIXES[MTAF_7.name]),
            MTAF_7,
            dataset_root=root,
        )


def default_root() -> str:
    return os.path.join(datasets_root(), "cityscapes")
