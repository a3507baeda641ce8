"""Cityscapes (and anything in its layout, such as the embedded synthetic pair).

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
from typing import List, Sequence

from uda_plugins.data.labels import (
    CITYSCAPES_19,
    MTAF_7,
    apply_lut,
    cityscapes_labelid_to_mtaf7,
    cityscapes_labelid_to_trainid,
)

from .common import convert_label_files, datasets_root, image_size, register_sem_seg, require_dir

__all__ = ["LABEL_SUFFIXES", "load_cityscapes_semseg", "prepare_cityscapes", "register_cityscapes"]

IMAGE_SUFFIX = "_leftImg8bit.png"
RAW_LABEL_SUFFIX = "_gtFine_labelIds.png"
# class set name -> suffix of the prepared label files
LABEL_SUFFIXES = {CITYSCAPES_19.name: "_gtFine_labelTrainIds.png", MTAF_7.name: "_gtFine_label7Ids.png"}


def _image_files(root: str, split: str) -> List[str]:
    image_dir = require_dir(os.path.join(root, "leftImg8bit", split), f"Cityscapes-layout image ({split})")
    files = sorted(glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX)))
    if not files:
        raise FileNotFoundError(f"No '*{IMAGE_SUFFIX}' images under '{image_dir}/<city>/'")
    return files


def _label_file(root: str, split: str, image_file: str, suffix: str) -> str:
    city = os.path.basename(os.path.dirname(image_file))
    stem = os.path.basename(image_file)[: -len(IMAGE_SUFFIX)]
    return os.path.join(root, "gtFine", split, city, stem + suffix)


def load_cityscapes_semseg(root: str, split: str, label_suffix: str = LABEL_SUFFIXES["cityscapes19"]) -> List[dict]:
    """One dict per image: ``file_name``, ``sem_seg_file_name``, ``height``, ``width``, ``image_id``.
    Every image must have its prepared label file (the error names both and the command that makes it)."""
    require_dir(root, "Cityscapes-layout dataset root")
    require_dir(os.path.join(root, "gtFine", split), f"Cityscapes-layout label ({split})")
    dicts = []
    for image_file in _image_files(root, split):
        label_file = _label_file(root, split, image_file, label_suffix)
        if not os.path.isfile(label_file):
            raise FileNotFoundError(
                f"Image '{image_file}' has no label file '{label_file}' "
                f"(run: python tools/prepare_cityscapes.py --root {root})"
            )
        height, width = image_size(image_file)
        city = os.path.basename(os.path.dirname(image_file))
        dicts.append(
            {
                "file_name": image_file,
                "sem_seg_file_name": label_file,
                "height": height,
                "width": width,
                "image_id": city + "/" + os.path.basename(image_file)[: -len(IMAGE_SUFFIX)],
            }
        )
    return dicts


def prepare_cityscapes(root: str, splits: Sequence[str] = ("train", "val"), skip_existing: bool = True) -> int:
    """Write the 19-class and 7-class label files next to every ``*_gtFine_labelIds.png``."""
    luts = {
        LABEL_SUFFIXES[CITYSCAPES_19.name]: cityscapes_labelid_to_trainid(),
        LABEL_SUFFIXES[MTAF_7.name]: cityscapes_labelid_to_mtaf7(),
    }
    written = 0
    for split in splits:
        raw_files = []
        for image_file in _image_files(root, split):
            raw = _label_file(root, split, image_file, RAW_LABEL_SUFFIX)
            if not os.path.isfile(raw):
                raise FileNotFoundError(f"Image '{image_file}' has no label file '{raw}'")
            raw_files.append(raw)
        for suffix, lut in luts.items():
            pairs = [(raw, raw[: -len(RAW_LABEL_SUFFIX)] + suffix) for raw in raw_files]
            written += convert_label_files(
                pairs, lambda label, src, lut=lut: apply_lut(label, lut, src), f"cityscapes {split} -> {suffix}",
                skip_existing=skip_existing,
            )
    return written


def register_cityscapes(root: str, prefix: str = "cityscapes") -> None:
    """``{prefix}_{train,val}`` (19 classes) and ``{prefix}_7cls_{train,val}`` (MTAF 7 classes)."""
    for split in ("train", "val"):
        register_sem_seg(
            f"{prefix}_{split}",
            lambda split=split: load_cityscapes_semseg(root, split, LABEL_SUFFIXES[CITYSCAPES_19.name]),
            CITYSCAPES_19,
            eval_subsets=("synthia16", "synthia13"),
            dataset_root=root,
        )
        register_sem_seg(
            f"{prefix}_7cls_{split}",
            lambda split=split: load_cityscapes_semseg(root, split, LABEL_SUFFIXES[MTAF_7.name]),
            MTAF_7,
            dataset_root=root,
        )


def default_root() -> str:
    return os.path.join(datasets_root(), "cityscapes")
