"""IDD Segmentation (India Driving Dataset, Varma et al. 2019), a real target of the multi-target benchmarks.

Layout (``<root>`` = ``$UDA_DATASETS/idd``), Cityscapes-like::

    leftImg8bit/{train,val}/<seq>/<id>_leftImg8bit.png
    gtFine/{train,val}/<seq>/<id>_gtFine_polygons.json       as downloaded
    gtFine/{train,val}/<seq>/<id>_gtFine_labelids.png         IDD toolkit, --id-type id (see below)
    gtFine/{train,val}/<seq>/<id>_gtFine_labelTrainIds.png    19 Cityscapes classes  (tools/prepare_idd.py)
    gtFine/{train,val}/<seq>/<id>_gtFine_label7Ids.png        MTAF 7 classes         (tools/prepare_idd.py)

**Which id level.** IDD's toolkit (AutoNUE/public-code ``preperation/createLabels.py``) rasterises the polygons
at one of several id levels; its README's default, ``level3Id`` (26 classes, ``_gtFine_labellevel3Ids.png``), is
*not* what the benchmark tables index. MCL's and MTAF's tables (``data/idd_list/info19class.json``,
``info7class.json``) list the 40 input ids 0..39 and their loaders read ``<id>_gtFine_labelids.png``: the full
``id`` level of ``helpers/anue_labels.py`` (0 road, 1 parking, 2 drivable fallback, 3 sidewalk, ... 32 vegetation,
33 sky, 34 fallback background, 35 unlabeled (the background the toolkit draws), ... 39 license plate). Make them
with::

    python preperation/createLabels.py --datadir <root> --id-type id

The 19-class table agrees with the toolkit's own ``csTrainId`` column; notable choices it inherits: non-drivable
fallback (5) -> terrain, parking (1), drivable fallback (2), curb, billboard, autorickshaw and vehicle fallback are
ignored. The 7-class table maps road, drivable fallback and sidewalk to flat, but ignores parking.
"""

from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np

from uda_plugins.data.labels import CITYSCAPES_19, MTAF_7, build_lut

from .cityscapes import LABEL_SUFFIXES, load_cityscapes_layout, prepare_cityscapes_layout
from .common import datasets_root, register_sem_seg

__all__ = [
    "LABEL_SUFFIXES",
    "idd_id_to_trainid",
    "idd_id_to_mtaf7",
    "load_idd_semseg",
    "prepare_idd",
    "register_idd",
    "default_root",
]

RAW_LABEL_SUFFIX = "_gtFine_labelids.png"
PREPARE_COMMAND = "python tools/prepare_idd.py"

_IDD_IDS = tuple(range(40))  # the ``id`` level of AutoNUE/public-code helpers/anue_labels.py

# feifei-cv/MCL@27b2bbad2575657994a57612da803bcb2d67fb6b:data/idd_list/info19class.json (``label2train``; its
# ignore value 250 is our 255, and the ids it sends there are left out).
_IDD_TO_TRAINID = {
    0: 0,  # road
    3: 1,  # sidewalk
    5: 9,  # non-drivable fallback -> terrain
    6: 11,  # person
    8: 12,  # rider
    9: 17,  # motorcycle
    10: 18,  # bicycle
    12: 13,  # car
    13: 14,  # truck
    14: 15,  # bus
    17: 16,  # train
    20: 3,  # wall
    21: 4,  # fence
    24: 7,  # traffic sign
    25: 6,  # traffic light
    26: 5,  # pole
    29: 2,  # building
    32: 8,  # vegetation
    33: 10,  # sky
}

# feifei-cv/MCL@27b2bbad2575657994a57612da803bcb2d67fb6b:data/idd_list/info7class.json, identical to
# valeoai/MTAF@d1a58fa7874dc308d0ab242fcb563215cf673861:mtaf/dataset/idd_list/info7class.json.
_IDD_TO_MTAF7 = {
    0: 0,
    2: 0,
    3: 0,  # road, drivable fallback, sidewalk -> flat
    6: 5,
    8: 5,  # person, rider -> human
    **{i: 6 for i in range(9, 19)},  # motorcycle .. vehicle fallback -> vehicle
    19: 1,
    20: 1,
    21: 1,
    29: 1,  # curb, wall, fence, building -> construction
    23: 2,
    24: 2,
    25: 2,
    26: 2,  # billboard, traffic sign, traffic light, pole -> object
    32: 3,  # vegetation -> nature
    33: 4,  # sky
}


def idd_id_to_trainid() -> np.ndarray:
    """IDD ``id``-level labels (0..39) -> 19 Cityscapes trainIds."""
    return build_lut(_IDD_TO_TRAINID, known_ignored=_IDD_IDS)


def idd_id_to_mtaf7() -> np.ndarray:
    """IDD ``id``-level labels (0..39) -> the 7 MTAF classes."""
    return build_lut(_IDD_TO_MTAF7, known_ignored=_IDD_IDS)


def load_idd_semseg(root: str, split: str, label_suffix: str = LABEL_SUFFIXES[CITYSCAPES_19.name]) -> List[dict]:
    """One dict per image (``image_id`` = ``<seq>/<id>``); every image must have its prepared label file."""
    return load_cityscapes_layout(root, split, label_suffix, "IDD", PREPARE_COMMAND)


def prepare_idd(root: str, splits: Sequence[str] = ("train", "val"), skip_existing: bool = True) -> int:
    """Write the 19-class and 7-class label files next to every ``*_gtFine_labelids.png``. Returns the number of
    files written."""
    luts = {LABEL_SUFFIXES[CITYSCAPES_19.name]: idd_id_to_trainid(), LABEL_SUFFIXES[MTAF_7.name]: idd_id_to_mtaf7()}
    hint = (
        f"make the id-level labels with IDD's toolkit: python preperation/createLabels.py --datadir {root} --id-type id"
    )
    return prepare_cityscapes_layout(root, splits, RAW_LABEL_SUFFIX, luts, "IDD", hint, skip_existing)


def register_idd(root: str, name_prefix: str = "idd") -> None:
    """``<prefix>_{train,val}`` (19 classes) and ``<prefix>_7cls_{train,val}`` (MTAF 7 classes); nothing is read
    until used."""
    for split in ("train", "val"):
        register_sem_seg(
            f"{name_prefix}_{split}",
            lambda split=split: load_idd_semseg(root, split, LABEL_SUFFIXES[CITYSCAPES_19.name]),
            CITYSCAPES_19,
            dataset_root=root,
        )
        register_sem_seg(
            f"{name_prefix}_7cls_{split}",
            lambda split=split: load_idd_semseg(root, split, LABEL_SUFFIXES[MTAF_7.name]),
            MTAF_7,
            dataset_root=root,
        )


def default_root() -> str:
    return os.path.join(datasets_root(), "idd")
