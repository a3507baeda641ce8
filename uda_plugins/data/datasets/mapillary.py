"""Mapillary Vistas v1.2 (Neuhold et al. 2017), a real target of the multi-target benchmarks: 18,000 training and
2,000 validation street images from all over the world, 66 classes.

Layout (``<root>`` = ``$UDA_DATASETS/mapillary``), as the v1.2 download unpacks::

    config.json                                   the 66 classes, in label-index order
    {training,validation}/images/<stem>.jpg
    {training,validation}/labels/<stem>.png       as downloaded: 8-bit palette PNG, index into config.json
    {training,validation}/labels/<stem>_labelTrainIds.png    19 Cityscapes classes  (tools/prepare_mapillary.py)
    {training,validation}/labels/<stem>_label7Ids.png        MTAF 7 classes         (tools/prepare_mapillary.py)

The v2.0 download carries the v1.2 labels too, as ``config_v1.2.json`` and ``{split}/v1.2/labels/`` (the layout
MCL reads); when ``config.json`` is absent and ``config_v1.2.json`` is present, that layout is used instead. The
v2.0 labels themselves (124 classes) are not supported: their class names are not in the tables below.

Classes are mapped **by name**, as MTAF and MCL do: each ``config.json`` entry's ``readable`` name, lower-cased,
is looked up in the tables below, so the label indices always come from the config that ships with the labels.
A config class missing from a table stops preparation with its name. Noteworthy choices of the authors' tables:
terrain -> flat in the 7-class protocol (nature for Cityscapes); both traffic-sign faces -> traffic sign and
"on rails" -> train in the 19-class one; curb, guard rail, barrier, bridge, tunnel, lane markings, crosswalks,
parking, bike lane, street light and utility pole are ignored in the 19-class setting but counted in the 7-class one.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from uda_plugins.data.labels import CITYSCAPES_19, MTAF_7, ClassSet, build_lut

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
    "SPLIT_FOLDERS",
    "mapillary_layout",
    "read_mapillary_classes",
    "mapillary_lut",
    "load_mapillary_semseg",
    "prepare_mapillary",
    "register_mapillary",
    "default_root",
]

SPLIT_FOLDERS = {"train": "training", "val": "validation"}
# class set name -> suffix of the prepared label files (beside the raw labels/<stem>.png)
LABEL_SUFFIXES = {CITYSCAPES_19.name: "_labelTrainIds.png", MTAF_7.name: "_label7Ids.png"}
PREPARE_COMMAND = "python tools/prepare_mapillary.py"

# Mapillary class name (``readable``, lower-cased) -> Cityscapes class name; None = ignored ("other").
# feifei-cv/MCL@27b2bbad2575657994a57612da803bcb2d67fb6b:data/mapillary_dataset.py
# (``classes_mappings_mapillary_to_cityscapes_19``).
_MAPILLARY_TO_19: Dict[str, Optional[str]] = {
    "bird": None,
    "ground animal": None,
    "curb": None,
    "fence": "fence",
    "guard rail": None,
    "barrier": None,
    "wall": "wall",
    "bike lane": None,
    "crosswalk - plain": None,
    "curb cut": None,
    "parking": None,
    "pedestrian area": None,
    "rail track": None,
    "road": "road",
    "service lane": None,
    "sidewalk": "sidewalk",
    "bridge": None,
    "building": "building",
    "tunnel": None,
    "person": "person",
    "bicyclist": "rider",
    "motorcyclist": "rider",
    "other rider": "rider",
    "lane marking - crosswalk": None,
    "lane marking - general": None,
    "mountain": None,
    "sand": None,
    "sky": "sky",
    "snow": None,
    "terrain": "terrain",
    "vegetation": "vegetation",
    "water": None,
    "banner": None,
    "bench": None,
    "bike rack": None,
    "billboard": None,
    "catch basin": None,
    "cctv camera": None,
    "fire hydrant": None,
    "junction box": None,
    "mailbox": None,
    "manhole": None,
    "phone booth": None,
    "pothole": None,
    "street light": None,
    "pole": "pole",
    "traffic sign frame": None,
    "utility pole": None,
    "traffic light": "traffic light",
    "traffic sign (back)": "traffic sign",
    "traffic sign (front)": "traffic sign",
    "trash can": None,
    "bicycle": "bicycle",
    "boat": None,
    "bus": "bus",
    "car": "car",
    "caravan": None,
    "motorcycle": "motorcycle",
    "on rails": "train",
    "other vehicle": None,
    "trailer": None,
    "truck": "truck",
    "wheeled slow": None,
    "car mount": None,
    "ego vehicle": None,
    "unlabeled": None,
}

# Mapillary class name -> MTAF 7-class name; None = ignored ("other").
# valeoai/MTAF@d1a58fa7874dc308d0ab242fcb563215cf673861:mtaf/dataset/mapillary.py
# (``classes_mappings_mapillary_to_cityscapes``), identical in
# feifei-cv/MCL@27b2bbad2575657994a57612da803bcb2d67fb6b:data/mapillary_dataset.py.
_MAPILLARY_TO_7: Dict[str, Optional[str]] = {
    "bird": None,
    "ground animal": None,
    "curb": "construction",
    "fence": "construction",
    "guard rail": "construction",
    "barrier": "construction",
    "wall": "construction",
    "bike lane": "flat",
    "crosswalk - plain": "flat",
    "curb cut": "flat",
    "parking": "flat",
    "pedestrian area": "flat",
    "rail track": "flat",
    "road": "flat",
    "service lane": "flat",
    "sidewalk": "flat",
    "bridge": "construction",
    "building": "construction",
    "tunnel": "construction",
    "person": "human",
    "bicyclist": "human",
    "motorcyclist": "human",
    "other rider": "human",
    "lane marking - crosswalk": "flat",
    "lane marking - general": "flat",
    "mountain": None,
    "sand": None,
    "sky": "sky",
    "snow": None,
    "terrain": "flat",
    "vegetation": "nature",
    "water": None,
    "banner": None,
    "bench": None,
    "bike rack": None,
    "billboard": None,
    "catch basin": None,
    "cctv camera": None,
    "fire hydrant": None,
    "junction box": None,
    "mailbox": None,
    "manhole": None,
    "phone booth": None,
    "pothole": "object",
    "street light": "object",
    "pole": "object",
    "traffic sign frame": "object",
    "utility pole": "object",
    "traffic light": "object",
    "traffic sign (back)": "object",
    "traffic sign (front)": "object",
    "trash can": None,
    "bicycle": "vehicle",
    "boat": "vehicle",
    "bus": "vehicle",
    "car": "vehicle",
    "caravan": "vehicle",
    "motorcycle": "vehicle",
    "on rails": "vehicle",
    "other vehicle": "vehicle",
    "trailer": "vehicle",
    "truck": "vehicle",
    "wheeled slow": "vehicle",
    "car mount": None,
    "ego vehicle": None,
    "unlabeled": None,
}

_TABLES = {CITYSCAPES_19.name: _MAPILLARY_TO_19, MTAF_7.name: _MAPILLARY_TO_7}


def mapillary_layout(root: str) -> Tuple[str, str]:
    """(config file, labels folder relative to a split folder) of the v1.2 labels under ``root``: the v1.2
    download (``config.json``, ``labels``) or the v2.0 download's copy (``config_v1.2.json``, ``v1.2/labels``)."""
    require_dir(root, "Mapillary Vistas dataset root")
    for config_name, labels_dir in (("config.json", "labels"), ("config_v1.2.json", os.path.join("v1.2", "labels"))):
        config = os.path.join(root, config_name)
        if os.path.isfile(config):
            return config, labels_dir
    raise FileNotFoundError(
        f"Mapillary Vistas class config '{os.path.join(root, 'config.json')}' does not exist (nor the v2.0 "
        f"download's 'config_v1.2.json'); it names the classes the label indices refer to. See datasets/README.md."
    )


def read_mapillary_classes(config_file: str) -> List[str]:
    """The ``readable`` class names of a Vistas config, in label-index order."""
    try:
        with open(config_file) as f:
            entries = json.load(f)["labels"]
        return [entry["readable"] for entry in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"Mapillary Vistas config '{config_file}' is not a Vistas config.json (expected "
            f'{{"labels": [{{"readable": ...}}, ...]}}): {e!r}'
        ) from None


def mapillary_lut(class_names: Sequence[str], class_set: ClassSet, source: str) -> np.ndarray:
    """A LUT from label indices (positions in ``class_names``) to ``class_set`` indices, through the name tables.
    A name missing from the table fails naming ``source`` (the config file); indices beyond the config are unknown."""
    table = _TABLES[class_set.name]
    mapping, ignored = {}, []
    for index, name in enumerate(class_names):
        key = name.lower()
        if key not in table:
            raise ValueError(
                f"{source}: class '{name}' (label index {index}) is not in the Mapillary -> {class_set.name} table; "
                f"only Mapillary Vistas v1.2 labels are supported"
            )
        if table[key] is None:
            ignored.append(index)
        else:
            mapping[index] = class_set.index(table[key])
    return build_lut(mapping, known_ignored=ignored)


def _image_files(root: str, split: str) -> List[str]:
    image_dir = require_dir(os.path.join(root, SPLIT_FOLDERS[split], "images"), f"Mapillary Vistas image ({split})")
    files = sorted(glob.glob(os.path.join(image_dir, "*.jpg")))
    if not files:
        raise FileNotFoundError(f"No '*.jpg' images in '{image_dir}'")
    return files


def _label_dir(root: str, split: str, labels_dir: str) -> str:
    return require_dir(os.path.join(root, SPLIT_FOLDERS[split], labels_dir), f"Mapillary Vistas label ({split})")


def _stem(image_file: str) -> str:
    return os.path.splitext(os.path.basename(image_file))[0]


def _label_file(label_dir: str, image_file: str, suffix: str = ".png") -> str:
    return os.path.join(label_dir, _stem(image_file) + suffix)


def load_mapillary_semseg(root: str, split: str, label_suffix: str = LABEL_SUFFIXES[CITYSCAPES_19.name]) -> List[dict]:
    """One dict per image (``image_id`` = the file stem); every image must have its prepared label file."""
    _, labels_dir = mapillary_layout(root)
    image_files = _image_files(root, split)
    label_dir = _label_dir(root, split, labels_dir)
    return image_label_dicts(
        image_files, lambda f: _label_file(label_dir, f, label_suffix), _stem, f"run: {PREPARE_COMMAND} --root {root}"
    )


def prepare_mapillary(root: str, splits: Sequence[str] = ("train", "val"), skip_existing: bool = True) -> int:
    """Write the 19-class and 7-class label files next to every raw label, mapping the classes by the names in
    the config. Returns the number of files written."""
    config_file, labels_dir = mapillary_layout(root)
    class_names = read_mapillary_classes(config_file)
    luts = {LABEL_SUFFIXES[c.name]: mapillary_lut(class_names, c, config_file) for c in (CITYSCAPES_19, MTAF_7)}
    written = 0
    for split in splits:
        label_dir = _label_dir(root, split, labels_dir)
        raw_files = raw_label_files(_image_files(root, split), lambda f, d=label_dir: _label_file(d, f))
        written += write_prepared_labels(raw_files, ".png", luts, f"mapillary {split}", skip_existing)
    return written


def register_mapillary(root: str, name_prefix: str = "mapillary") -> None:
    """``<prefix>_{train,val}`` (19 classes) and ``<prefix>_7cls_{train,val}`` (MTAF 7 classes); nothing is read
    until used."""
    for split in ("train", "val"):
        register_sem_seg(
            f"{name_prefix}_{split}",
            lambda split=split: load_mapillary_semseg(root, split, LABEL_SUFFIXES[CITYSCAPES_19.name]),
            CITYSCAPES_19,
            dataset_root=root,
        )
        register_sem_seg(
            f"{name_prefix}_7cls_{split}",
            lambda split=split: load_mapillary_semseg(root, split, LABEL_SUFFIXES[MTAF_7.name]),
            MTAF_7,
            dataset_root=root,
        )


def default_root() -> str:
    return os.path.join(datasets_root(), "mapillary")
