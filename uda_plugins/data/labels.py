"""Class sets and label-id maps.

* ``CITYSCAPES_19``: the 19 Cityscapes train classes; names, colours and the labelId -> trainId map come from
  ``cityscapesscripts.helpers.labels``, not a copied table.
* ``MTAF_7``: the 7-class multi-target protocol of MTAF (valeoai/MTAF ``info7class.json``), reproduced by MCL.
* ``EVAL_SUBSETS``: the class subsets the SYNTHIA benchmark reports (mIoU16, mIoU13) as 19-class trainIds.

Maps are lookup tables (LUTs) over raw label values. A LUT entry is a class index, ``IGNORE_LABEL`` (a raw id
the protocol deliberately ignores) or ``UNKNOWN`` (a value that should not occur in that dataset at all).
:func:`apply_lut` raises on UNKNOWN values naming the file, so a wrong label format never trains silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS

__all__ = [
    "IGNORE_LABEL",
    "UNKNOWN",
    "ClassSet",
    "CITYSCAPES_19",
    "MTAF_7",
    "CLASS_SETS",
    "EVAL_SUBSETS",
    "SYNTHIA_16_CLASSES",
    "SYNTHIA_13_CLASSES",
    "UnknownLabelError",
    "build_lut",
    "apply_lut",
    "cityscapes_labelid_to_trainid",
    "cityscapes_labelid_to_mtaf7",
    "check_label_values",
    "palette",
    "class_set_of",
]

IGNORE_LABEL = 255
UNKNOWN = -1


@dataclass(frozen=True)
class ClassSet:
    """An ordered set of classes: index i has name ``classes[i]`` and colour ``colors[i]`` (RGB)."""

    name: str
    classes: Tuple[str, ...]
    colors: Tuple[Tuple[int, int, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, class_name: str) -> int:
        return self.classes.index(class_name)


_TRAIN_LABELS = sorted((lab for lab in _CITYSCAPES_LABELS if 0 <= lab.trainId < 255), key=lambda lab: lab.trainId)
CITYSCAPES_19 = ClassSet(
    name="cityscapes19",
    classes=tuple(lab.name for lab in _TRAIN_LABELS),
    colors=tuple(tuple(lab.color) for lab in _TRAIN_LABELS),
)
assert CITYSCAPES_19.num_classes == 19

MTAF_7 = ClassSet(
    name="mtaf7",
    classes=("flat", "construction", "object", "nature", "sky", "human", "vehicle"),
    colors=((128, 64, 128), (70, 70, 70), (153, 153, 153), (107, 142, 35), (70, 130, 180), (220, 20, 60), (0, 0, 142)),
)

CLASS_SETS: Dict[str, ClassSet] = {c.name: c for c in (CITYSCAPES_19, MTAF_7)}

# SYNTHIA has no terrain, truck or train; mIoU13 further drops wall, fence and pole (CBST/DAFormer convention:
# both are computed from the same model's 19-class confusion matrix).
SYNTHIA_16_CLASSES = tuple(c for c in CITYSCAPES_19.classes if c not in ("terrain", "truck", "train"))
SYNTHIA_13_CLASSES = tuple(c for c in SYNTHIA_16_CLASSES if c not in ("wall", "fence", "pole"))
EVAL_SUBSETS: Dict[str, Tuple[int, ...]] = {
    "synthia16": tuple(CITYSCAPES_19.index(c) for c in SYNTHIA_16_CLASSES),
    "synthia13": tuple(CITYSCAPES_19.index(c) for c in SYNTHIA_13_CLASSES),
}


class UnknownLabelError(ValueError):
    """A label file holds values outside the class table of its dataset."""


def build_lut(mapping: Mapping[int, int], known_ignored: Iterable[int] = (), size: int = 256) -> np.ndarray:
    """A LUT over raw values ``0..size-1``: ``mapping`` gives class indices, ``known_ignored`` raw values map to
    IGNORE_LABEL, every other value is UNKNOWN."""
    lut = np.full(size, UNKNOWN, dtype=np.int32)
    for raw in known_ignored:
        lut[raw] = IGNORE_LABEL
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


def apply_lut(label: np.ndarray, lut: np.ndarray, source: str) -> np.ndarray:
    """Map raw ``label`` values through ``lut`` to a uint8 class map; raise naming ``source`` (a file) on values
    the dataset should not contain."""
    if label.size and int(label.max()) >= len(lut):
        bad = np.unique(label[label >= len(lut)])[:10].tolist()
        raise UnknownLabelError(f"{source}: label values {bad} are outside the class table of this dataset")
    out = lut[label]
    if (out == UNKNOWN).any():
        bad = np.unique(label[out == UNKNOWN])[:10].tolist()
        raise UnknownLabelError(f"{source}: label values {bad} are not in the class table of this dataset")
    return out.astype(np.uint8)


# ILM-ASSL's SYNTHIA labels (licongguan/ILM-ASSL core/dataset/cityscapes_semi_cp.py, ``id_to_trainid_synthia``):
# the 16 SYNTHIA classes on contiguous ids 0..15, while its model and its Cityscapes labels use the 19 trainIds, so
# sky, person, rider, car, bus, motorcycle and bicycle land on other classes' ids (docs/methods.md §6.9.3). As a
# map of this project's 19-class SYNTHIA labels, for ``synthia_ilm_assl_ids_train`` (reproduction only).
_ILM_ASSL_SYNTHIA = {
    0: 0,
    1: 1,
    2: 2,
    3: 3,
    4: 4,
    5: 5,
    6: 6,
    7: 7,
    8: 8,
    10: 9,
    11: 10,
    12: 11,
    13: 12,
    15: 13,
    17: 14,
    18: 15,
}

# Label maps a dataset dict may name (``"label_map"``): applied to its prepared labels when they are read.
# (terrain, truck, train: absent from SYNTHIA, not in the release's table, ignored.)
LABEL_MAPS = {"ilm_assl_synthia": build_lut(_ILM_ASSL_SYNTHIA, known_ignored=(9, 14, 16, IGNORE_LABEL))}


def check_label_values(label: np.ndarray, num_classes: int, source: str, ignore_label: int = IGNORE_LABEL) -> None:
    """Raise if a prepared (class-index) label map holds a value that is neither a class nor the ignore label."""
    valid = np.zeros(256, dtype=bool)
    valid[:num_classes] = True
    valid[ignore_label] = True
    if label.dtype != np.uint8:
        if label.size and (int(label.max()) > 255 or int(label.min()) < 0):
            raise UnknownLabelError(
                f"{source}: label values outside 0..255 (max {int(label.max())}); expected class indices "
                f"0..{num_classes - 1} or {ignore_label} (run the dataset's tools/prepare_* script)"
            )
        label = label.astype(np.uint8)
    if not valid[label].all():
        bad = np.unique(label[~valid[label]])[:10].tolist()
        raise UnknownLabelError(
            f"{source}: label values {bad} are not classes 0..{num_classes - 1} or ignore {ignore_label} "
            f"(was the file prepared with the right tools/prepare_* script?)"
        )


_CITYSCAPES_IDS = [lab.id for lab in _CITYSCAPES_LABELS if lab.id >= 0]


def cityscapes_labelid_to_trainid() -> np.ndarray:
    """Cityscapes labelIds (0..33) -> 19 trainIds; void/ignored ids -> 255 (cityscapesscripts' table)."""
    mapping = {lab.id: lab.trainId for lab in _CITYSCAPES_LABELS if lab.id >= 0 and 0 <= lab.trainId < 255}
    return build_lut(mapping, known_ignored=_CITYSCAPES_IDS)


# MTAF info7class.json (Cityscapes labelIds). Note: terrain is "nature" here but "flat" for GTA5 and Mapillary,
# a quirk of the protocol that MCL inherits (docs/methods.md §3.7); each dataset module carries its own table.
_CITYSCAPES_TO_MTAF7 = {
    7: 0,
    8: 0,  # road, sidewalk -> flat
    11: 1,
    12: 1,
    13: 1,  # building, wall, fence -> construction
    17: 2,
    19: 2,
    20: 2,  # pole, traffic light, traffic sign -> object
    21: 3,
    22: 3,  # vegetation, terrain -> nature
    23: 4,  # sky
    24: 5,
    25: 5,  # person, rider -> human
    26: 6,
    27: 6,
    28: 6,
    29: 6,
    30: 6,
    31: 6,
    32: 6,
    33: 6,  # car .. bicycle (with caravan, trailer) -> vehicle
}


def cityscapes_labelid_to_mtaf7() -> np.ndarray:
    """Cityscapes labelIds -> the 7 MTAF classes; everything else -> 255."""
    return build_lut(_CITYSCAPES_TO_MTAF7, known_ignored=_CITYSCAPES_IDS)


def palette(class_set: ClassSet, ignore_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """A (256, 3) uint8 colour table: class i -> its colour, everything else (ignore) -> ``ignore_color``."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:] = np.asarray(ignore_color, dtype=np.uint8)
    table[: class_set.num_classes] = np.asarray(class_set.colors, dtype=np.uint8)
    return table


def class_set_of(name: Optional[str]) -> ClassSet:
    if name not in CLASS_SETS:
        raise KeyError(f"Unknown class set '{name}'; known: {sorted(CLASS_SETS)}")
    return CLASS_SETS[name]
