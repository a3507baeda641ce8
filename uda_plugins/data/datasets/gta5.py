"""GTA5 ("Playing for Data", Richter et al. 2016): the standard synthetic source, 24,966 game frames.

Layout (``<root>`` = ``$UDA_DATASETS/gta5``)::

    images/XXXXX.png                  1914x1052 RGB frames (a few are another size)
    labels/XXXXX.png                  as downloaded: palette PNGs whose palette *indices* are Cityscapes labelIds
    labels/XXXXX_labelTrainIds.png    19 Cityscapes classes        (tools/prepare_gta5.py)
    labels/XXXXX_label7Ids.png        MTAF 7-class protocol        (tools/prepare_gta5.py)

The raw labels are read as palette indices (``common.read_label``); ``convert("L")`` would turn the palette
*colours* into grey levels and silently corrupt every class.

* 19 classes: cityscapesscripts' labelId -> trainId table (``labels.cityscapes_labelid_to_trainid``), the same
  table as lhoyer/DAFormer@e6f6e041e7477b642106c134c1715fc934ccd210:tools/convert_datasets/gta.py.
* 7 classes: MTAF's *GTA5* table, which is not the Cityscapes one: terrain (22) -> flat (Cityscapes: nature) and
  caravan/trailer (29/30) are not mapped, so they are ignored (Cityscapes: vehicle). MCL copies it unchanged.
* Raw value 34 is accepted and ignored: MCL's GTA5 loader lists it among the void classes (besides the Cityscapes
  void ids). Whether the released labels contain it could not be checked here; every other value outside
  0..34 stops preparation with the file's name.

The whole set is the training split (``gta5_train``), as in every UDA work; the official ``split.mat`` is unused.
A few frames have a label of another size than the image. The authors' loaders resize image and label
independently to one training size, which amounts to resizing the label to the image; ``prepare_gta5`` does
exactly that (nearest neighbour) for those files and logs each of them, so training never meets a size mismatch.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Dict, List

import cv2
import numpy as np

from uda_plugins.data.labels import (
    CITYSCAPES_19,
    IGNORE_LABEL,
    MTAF_7,
    build_lut,
    cityscapes_labelid_to_trainid,
)

from .common import (
    datasets_root,
    image_label_dicts,
    image_size,
    raw_label_files,
    register_sem_seg,
    require_dir,
    write_prepared_labels,
)

__all__ = [
    "LABEL_SUFFIXES",
    "gta5_labelid_to_trainid",
    "gta5_labelid_to_mtaf7",
    "load_gta5_semseg",
    "prepare_gta5",
    "register_gta5",
    "default_root",
]

logger = logging.getLogger(__name__)

# class set name -> suffix of the prepared label files (beside the raw labels/XXXXX.png)
LABEL_SUFFIXES = {CITYSCAPES_19.name: "_labelTrainIds.png", MTAF_7.name: "_label7Ids.png"}
PREPARE_COMMAND = "python tools/prepare_gta5.py"

# Raw values a GTA5 label may hold: the Cityscapes labelIds 0..33 plus 34, which MCL treats as void
# (feifei-cv/MCL@27b2bbad2575657994a57612da803bcb2d67fb6b:data/gta5_dataset.py, ``void_classes``).
_GTA5_RAW_IDS = tuple(range(35))

# valeoai/MTAF@d1a58fa7874dc308d0ab242fcb563215cf673861:mtaf/dataset/gta5.py (num_classes == 7), identical in
# feifei-cv/MCL@27b2bbad2575657994a57612da803bcb2d67fb6b:data/gta5_dataset.py (n_classes == 7).
_GTA5_TO_MTAF7 = {
    7: 0,
    8: 0,  # road, sidewalk -> flat
    11: 1,
    12: 1,
    13: 1,  # building, wall, fence -> construction
    17: 2,
    19: 2,
    20: 2,  # pole, traffic light, traffic sign -> object
    21: 3,  # vegetation -> nature
    22: 0,  # terrain -> flat (nature in the Cityscapes table)
    23: 4,  # sky
    24: 5,
    25: 5,  # person, rider -> human
    26: 6,
    27: 6,
    28: 6,
    31: 6,
    32: 6,
    33: 6,  # car, truck, bus, train, motorcycle, bicycle -> vehicle
}


def gta5_labelid_to_trainid() -> np.ndarray:
    """GTA5 raw ids -> 19 trainIds: the Cityscapes table, with GTA's extra void id 34 ignored."""
    lut = cityscapes_labelid_to_trainid().copy()
    lut[34] = IGNORE_LABEL
    return lut


def gta5_labelid_to_mtaf7() -> np.ndarray:
    """GTA5 raw ids -> the 7 MTAF classes (terrain -> flat; caravan/trailer ignored)."""
    return build_lut(_GTA5_TO_MTAF7, known_ignored=_GTA5_RAW_IDS)


def _image_files(root: str) -> List[str]:
    require_dir(root, "GTA5 dataset root")
    image_dir = require_dir(os.path.join(root, "images"), "GTA5 image")
    files = sorted(glob.glob(os.path.join(image_dir, "*.png")))
    if not files:
        raise FileNotFoundError(f"No '*.png' images in '{image_dir}'")
    return files


def _stem(image_file: str) -> str:
    return os.path.splitext(os.path.basename(image_file))[0]


def _label_file(root: str, image_file: str, suffix: str = ".png") -> str:
    return os.path.join(root, "labels", _stem(image_file) + suffix)


def load_gta5_semseg(root: str, label_suffix: str = LABEL_SUFFIXES[CITYSCAPES_19.name]) -> List[dict]:
    """One dict per frame (``image_id`` = the file stem, ``raw_sem_seg_file_name`` = the label as downloaded, which a
    release reading it directly sees); every frame must have its prepared label file."""
    image_files = _image_files(root)
    require_dir(os.path.join(root, "labels"), "GTA5 label")
    dicts = image_label_dicts(
        image_files, lambda f: _label_file(root, f, label_suffix), _stem, f"run: {PREPARE_COMMAND} --root {root}"
    )
    return [dict(d, raw_sem_seg_file_name=_label_file(root, d["file_name"])) for d in dicts]


def prepare_gta5(root: str, skip_existing: bool = True) -> int:
    """Write ``labels/XXXXX_labelTrainIds.png`` and ``labels/XXXXX_label7Ids.png`` for every frame; a label of
    another size than its image is resized to it (nearest neighbour, logged: a few released GTA5 frames have one).
    Returns the number of files written."""
    image_files = _image_files(root)
    require_dir(os.path.join(root, "labels"), "GTA5 label")
    raw_files = raw_label_files(image_files, lambda f: _label_file(root, f))
    image_of: Dict[str, str] = dict(zip(raw_files, image_files))
    resized = set()

    def fit_to_image(label: np.ndarray, src: str) -> np.ndarray:
        height, width = image_size(image_of[src])
        if label.shape == (height, width):
            return label
        if src not in resized:
            logger.warning(
                "GTA5 label '%s' is %dx%d but its image is %dx%d: resizing the label (nearest neighbour)",
                src,
                label.shape[0],
                label.shape[1],
                height,
                width,
            )
            resized.add(src)
        return cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)

    luts = {
        LABEL_SUFFIXES[CITYSCAPES_19.name]: gta5_labelid_to_trainid(),
        LABEL_SUFFIXES[MTAF_7.name]: gta5_labelid_to_mtaf7(),
    }
    return write_prepared_labels(raw_files, ".png", luts, "gta5", skip_existing, post=fit_to_image)


def register_gta5(root: str, name_prefix: str = "gta5") -> None:
    """``<prefix>_train`` (19 classes) and ``<prefix>_7cls_train`` (MTAF 7 classes); nothing is read until used."""
    register_sem_seg(
        f"{name_prefix}_train",
        lambda: load_gta5_semseg(root, LABEL_SUFFIXES[CITYSCAPES_19.name]),
        CITYSCAPES_19,
        dataset_root=root,
    )
    register_sem_seg(
        f"{name_prefix}_7cls_train",
        lambda: load_gta5_semseg(root, LABEL_SUFFIXES[MTAF_7.name]),
        MTAF_7,
        dataset_root=root,
    )


def default_root() -> str:
    return os.path.join(datasets_root(), "gta5")
