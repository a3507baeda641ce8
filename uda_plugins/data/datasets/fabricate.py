"""Fabricated copies of the real datasets: a few images of each, in its documented raw layout (datasets/README.md),
at its real resolutions and aspect ratios, with raw labels in its own format and id space.

What a config check at real shapes trains on (``tools/check_configs.py``): the prepare tools, the loaders, the
geometry and every method see the files a user downloads, only fewer of them. The scenes are simple street
layouts (sky, building and vegetation, sidewalk, road, and a box for each other class), so every class that a
dataset labels covers thousands of pixels (rare-class sampling needs more than 3000 per image) and the images
have smooth content per class. Nothing here is random at run time: the files depend only on ``seed``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

__all__ = ["REAL_SIZES", "fabricate_datasets", "street_label"]

Size = Tuple[int, int]  # (height, width)

# Per dataset and split, the (height, width) of each fabricated image: the real datasets' resolutions.
REAL_SIZES: Dict[str, Dict[str, List[Size]]] = {
    "gta5": {"train": [(1052, 1914)] * 4},
    "cityscapes": {"train": [(1024, 2048)] * 4, "val": [(1024, 2048)]},
    "synthia": {"train": [(760, 1280)] * 3},
    # IDD 20k Part I: 1920x1080 and 1280x720 frames.
    "idd": {"train": [(1080, 1920), (720, 1280), (1080, 1920), (720, 1280)], "val": [(720, 1280)]},
    # Mapillary Vistas: from 4:3 to 16:9, up to 4000 px wide.
    "mapillary": {"train": [(3000, 4000), (1536, 2048), (1080, 1920), (2160, 3840)], "val": [(2448, 3264)]},
}

# A GTA5 frame whose label is two rows taller than its image, as a few real ones are (the prepare step resizes it).
_GTA5_ODD_LABEL_ROWS = 2


@dataclass(frozen=True)
class _IdSpace:
    """A dataset's raw label ids: the layout classes (sky, building, vegetation, sidewalk, road), the classes drawn
    as boxes, and a void id that covers the bottom rows (the ego vehicle)."""

    sky: int
    building: int
    vegetation: int
    sidewalk: int
    road: int
    objects: Tuple[int, ...]
    void: int


# Cityscapes labelIds (cityscapesscripts), also GTA5's palette indices.
_CITYSCAPES_IDS = _IdSpace(23, 11, 21, 8, 7, (12, 13, 17, 19, 20, 22, 24, 25, 26, 27, 28, 31, 32, 33), 1)
# SYNTHIA-RAND-CITYSCAPES class ids (wall, fence, pole, light, sign, person, rider, car, bus, motorcycle, bicycle,
# lane marking).
_SYNTHIA_IDS = _IdSpace(1, 2, 6, 4, 3, (21, 5, 7, 15, 9, 10, 17, 8, 19, 12, 11, 22), 0)
# IDD's `id` level (AutoNUE public-code anue_labels.py): wall, fence, pole, light, sign, person, rider, car, truck,
# bus, motorcycle, bicycle, non-drivable fallback, curb, billboard.
_IDD_IDS = _IdSpace(33, 29, 32, 3, 0, (20, 21, 26, 25, 24, 6, 8, 12, 13, 14, 9, 10, 5, 19, 23), 35)
_MAPILLARY_OBJECTS = (
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign (front)",
    "terrain",
    "person",
    "bicyclist",
    "car",
    "truck",
    "bus",
    "motorcycle",
    "bicycle",
    "curb",
    "billboard",
)


def _mapillary_classes() -> List[str]:
    from .mapillary import _MAPILLARY_TO_19

    return list(_MAPILLARY_TO_19)  # the 66 v1.2 classes


def _mapillary_ids() -> _IdSpace:
    index = {name: i for i, name in enumerate(_mapillary_classes())}
    return _IdSpace(
        index["sky"],
        index["building"],
        index["vegetation"],
        index["sidewalk"],
        index["road"],
        tuple(index[n] for n in _MAPILLARY_OBJECTS),
        index["ego vehicle"],
    )


def street_label(size: Size, ids: _IdSpace, seed: int) -> np.ndarray:
    """A street layout of raw ids at ``size``: sky above, building left and vegetation right, then sidewalk and
    road, a box of each object class side by side (1/8 of the height by 4/5 of its column, over 5000 pixels at the
    real sizes), the void id on the bottom rows."""
    h, w = size
    rng = np.random.default_rng(seed)
    label = np.empty((h, w), np.uint8)
    label[: int(0.3 * h)] = ids.sky
    label[int(0.3 * h) : int(0.55 * h), : w // 2] = ids.building
    label[int(0.3 * h) : int(0.55 * h), w // 2 :] = ids.vegetation
    label[int(0.55 * h) : int(0.62 * h)] = ids.sidewalk
    label[int(0.62 * h) :] = ids.road
    spacing = w // len(ids.objects)
    bh, bw = max(h // 8, 2), max(int(0.8 * spacing), 2)
    for k, class_id in enumerate(ids.objects):
        left = k * spacing + int(rng.integers(0, spacing - bw + 1))
        top = int(rng.integers(int(0.35 * h), int(0.8 * h) - bh))
        label[top : top + bh, left : left + bw] = class_id
    label[h - max(h // 40, 1) :] = ids.void
    return label


def _street_image(label: np.ndarray, seed: int) -> np.ndarray:
    """RGB: a colour per raw id with a smooth gradient, the same for every image of a dataset but for ``seed``'s
    brightness."""
    h, w = label.shape
    colours = np.random.default_rng(1234).integers(30, 226, (256, 3)).astype(np.float32)
    shade = np.linspace(0.85, 1.15, w, dtype=np.float32)[None, :, None] * (0.9 + 0.05 * (seed % 5))
    return np.clip(colours[label] * shade, 0, 255).astype(np.uint8)


def _write_image(path: str, rgb: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1] if path.endswith(".png") else [cv2.IMWRITE_JPEG_QUALITY, 90]
    if not cv2.imwrite(path, rgb[:, :, ::-1], params):
        raise OSError(f"Could not write '{path}'")


def _write_grey(path: str, ids: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(ids).save(path)


def _write_palette(path: str, ids: np.ndarray) -> None:
    """A palette PNG whose pixel indices are the ids (GTA5's and Mapillary's raw labels)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), np.ascontiguousarray(ids).tobytes())
    image.putpalette([(53 * i + 17) % 256 for i in range(3 * 256)])
    image.save(path)


def _write_synthia_label(path: str, ids: np.ndarray) -> None:
    """SYNTHIA's 16-bit 3-channel label, the class id in the first (R) channel, instance-like data in G."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    red = ids.astype(np.uint16)
    green = np.full_like(red, 1000)
    if not cv2.imwrite(path, np.stack([np.zeros_like(red), green, red], axis=-1)):  # BGR arrays -> RGB PNG
        raise OSError(f"Could not write '{path}'")


def _gta5(root: str, sizes: Sequence[Size], seed: int) -> None:
    for i, size in enumerate(sizes):
        label = street_label(size, _CITYSCAPES_IDS, seed + i)
        _write_image(os.path.join(root, "images", f"{i + 1:05d}.png"), _street_image(label, seed + i))
        if i == len(sizes) - 1:  # the frame whose label is taller than its image
            label = np.concatenate([label, label[-_GTA5_ODD_LABEL_ROWS:]], axis=0)
        _write_palette(os.path.join(root, "labels", f"{i + 1:05d}.png"), label)


def _cityscapes(root: str, splits: Dict[str, List[Size]], seed: int) -> None:
    for split, sizes in splits.items():
        for i, size in enumerate(sizes):
            city = ("aachen", "bochum")[i % 2] if split == "train" else "frankfurt"
            stem = f"{city}_{i:06d}_000019"
            label = street_label(size, _CITYSCAPES_IDS, seed + i)
            _write_image(
                os.path.join(root, "leftImg8bit", split, city, stem + "_leftImg8bit.png"), _street_image(label, i)
            )
            _write_grey(os.path.join(root, "gtFine", split, city, stem + "_gtFine_labelIds.png"), label)


def _synthia(root: str, sizes: Sequence[Size], seed: int) -> None:
    for i, size in enumerate(sizes):
        label = street_label(size, _SYNTHIA_IDS, seed + i)
        _write_image(os.path.join(root, "RGB", f"{i:07d}.png"), _street_image(label, seed + i))
        _write_synthia_label(os.path.join(root, "GT", "LABELS", f"{i:07d}.png"), label)


def _idd(root: str, splits: Dict[str, List[Size]], seed: int) -> None:
    for split, sizes in splits.items():
        for i, size in enumerate(sizes):
            sequence, frame = str(i % 2 * 31), f"{100 + i:06d}"
            label = street_label(size, _IDD_IDS, seed + i)
            folder = os.path.join(root, "leftImg8bit", split, sequence)
            _write_image(os.path.join(folder, f"{frame}_leftImg8bit.png"), _street_image(label, i))
            _write_grey(os.path.join(root, "gtFine", split, sequence, f"{frame}_gtFine_labelids.png"), label)


def _mapillary(root: str, splits: Dict[str, List[Size]], seed: int) -> None:
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"labels": [{"name": n.replace(" ", "-"), "readable": n.title()} for n in _mapillary_classes()]}, f)
    ids = _mapillary_ids()
    for split, sizes in splits.items():
        folder = {"train": "training", "val": "validation"}[split]
        for i, size in enumerate(sizes):
            stem = f"{split}{i:02d}_{size[1]}x{size[0]}"
            label = street_label(size, ids, seed + i)
            _write_image(os.path.join(root, folder, "images", stem + ".jpg"), _street_image(label, i))
            _write_palette(os.path.join(root, folder, "labels", stem + ".png"), label)


def fabricate_datasets(root: str, names: Sequence[str] = tuple(REAL_SIZES), seed: int = 0) -> Dict[str, str]:
    """Write the datasets ``names`` under ``root`` (``<root>/<name>/``, the layout ``$UDA_DATASETS`` has) at the
    sizes of :data:`REAL_SIZES`, unprepared (the prepare tools write the training labels); returns name -> folder."""
    writers = {
        "gta5": lambda r: _gta5(r, REAL_SIZES["gta5"]["train"], seed),
        "cityscapes": lambda r: _cityscapes(r, REAL_SIZES["cityscapes"], seed),
        "synthia": lambda r: _synthia(r, REAL_SIZES["synthia"]["train"], seed),
        "idd": lambda r: _idd(r, REAL_SIZES["idd"], seed),
        "mapillary": lambda r: _mapillary(r, REAL_SIZES["mapillary"], seed),
    }
    out = {}
    for name in names:
        folder = os.path.join(root, name)
        writers[name](folder)
        out[name] = folder
    return out
