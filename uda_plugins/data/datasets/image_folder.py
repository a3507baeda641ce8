"""Your own data without code: an image folder, an optional label folder and a class list.

    from uda_plugins.data.datasets.image_folder import register_image_folder
    register_image_folder("mine_train", "data/mine/images/train", "data/mine/classes.yaml",
                          label_dir="data/mine/labels/train")

or, from a config, ``DATASETS.REGISTER: ("data/mine/datasets.yaml",)`` with a file mapping names to folders::

    mine_train:
      images: images/train          # relative to this file's folder
      labels: labels/train          # optional: an unlabelled target split has none
      classes: classes.yaml         # or an inline list of names
      label_suffix: ""              # label = <labels>/<image path without extension><label_suffix>.png

Images are found recursively (``.png .jpg .jpeg .bmp .tif .tiff .webp``, sorted). Labels are single-channel PNGs of
class indices 0..C-1 in the class list's order, 255 = ignore (the Cityscapes trainId convention). The class list
(YAML or JSON) is a list of names, a list of ``{name, color}`` entries, or ``{classes: [...], colors: [...]}``;
classes without a colour get a fixed distinct one. An image without its label file, a missing folder or a bad
class list fails with one line naming it.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Union

import numpy as np

from uda_plugins.d2 import DatasetCatalog
from uda_plugins.data.labels import ClassSet

from .common import image_label_dicts, image_size, register_sem_seg, require_dir

__all__ = [
    "IMAGE_EXTENSIONS",
    "load_class_list",
    "image_folder_dicts",
    "register_image_folder",
    "register_datasets_file",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_registered: Dict[str, tuple] = {}  # name -> the arguments it was registered with (re-registering them is a no-op)


def _read_structured(path: str):
    with open(path) as f:
        if path.endswith(".json"):
            return json.load(f)
        import yaml

        return yaml.safe_load(f)


def load_class_list(spec: Union[str, Sequence], name: str = "custom") -> ClassSet:
    """A :class:`ClassSet` from a YAML/JSON file or an inline list (see the module docstring)."""
    data = spec
    where = "the inline class list"
    if isinstance(spec, str):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"Class list file '{spec}' does not exist")
        data, where = _read_structured(spec), f"class list '{spec}'"
    colors: List = []
    if isinstance(data, dict):
        names, colors = data.get("classes"), list(data.get("colors") or [])
    elif isinstance(data, (list, tuple)) and data and isinstance(data[0], dict):
        names = [d.get("name") for d in data]
        colors = [d.get("color") for d in data]
    else:
        names = data
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"{where} must list the class names (a list of strings, of {{name, color}} or {{classes: [...]}})"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{where} names a class twice")
    if len(names) > 255:
        raise ValueError(f"{where} has {len(names)} classes; labels are uint8 with 255 = ignore")
    rng = np.random.default_rng(len(names))
    table = []
    for k in range(len(names)):
        color = colors[k] if k < len(colors) and colors[k] is not None else rng.integers(0, 256, 3).tolist()
        if len(color) != 3 or not all(0 <= int(c) <= 255 for c in color):
            raise ValueError(f"{where}: the colour of '{names[k]}' must be 3 values in 0..255, not {color}")
        table.append(tuple(int(c) for c in color))
    return ClassSet(name, tuple(names), tuple(table))


def _image_files(image_dir: str) -> List[str]:
    files = []
    for folder, _, names in os.walk(image_dir):
        files += [os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


def image_folder_dicts(image_dir: str, label_dir: str = "", label_suffix: str = "") -> List[dict]:
    """The dataset dicts of an image folder (and its label folder), in sorted path order."""
    require_dir(image_dir, "Image")
    images = _image_files(image_dir)
    if not images:
        raise FileNotFoundError(f"Image folder '{image_dir}' holds no image ({', '.join(IMAGE_EXTENSIONS)})")

    def image_id(path: str) -> str:
        return os.path.splitext(os.path.relpath(path, image_dir))[0]

    if not label_dir:
        out = []
        for path in images:
            height, width = image_size(path)
            out.append({"file_name": path, "height": height, "width": width, "image_id": image_id(path)})
        return out
    require_dir(label_dir, "Label")
    return image_label_dicts(
        images,
        lambda path: os.path.join(label_dir, image_id(path) + label_suffix + ".png"),
        image_id,
        f"labels are <label folder>/<image path without extension>{label_suffix}.png",
    )


def register_image_folder(
    name: str, image_dir: str, classes: Union[str, Sequence], label_dir: str = "", label_suffix: str = ""
) -> None:
    """Register ``name`` in Detectron2's catalogs (lazily: the folders are read when the dataset is used).
    Registering the same name again with the same arguments does nothing; with others it fails."""
    key = (os.path.abspath(image_dir), os.path.abspath(label_dir) if label_dir else "", str(classes), label_suffix)
    if name in _registered and _registered[name] == key:
        return
    if name in DatasetCatalog.list():
        raise ValueError(f"Dataset '{name}' is already registered; choose another name")
    class_set = load_class_list(classes, name)
    register_sem_seg(name, lambda: image_folder_dicts(image_dir, label_dir, label_suffix), class_set)
    _registered[name] = key


def register_datasets_file(path: str) -> List[str]:
    """Register every dataset a YAML/JSON file describes (relative paths are relative to the file); returns the
    names."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DATASETS.REGISTER file '{path}' does not exist")
    spec = _read_structured(path)
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"'{path}' must map dataset names to {{images, labels, classes, label_suffix}}")
    base = os.path.dirname(os.path.abspath(path))

    def resolve(p: str) -> str:
        return p if not p or os.path.isabs(p) else os.path.join(base, p)

    for name, entry in spec.items():
        if not isinstance(entry, dict) or "images" not in entry or "classes" not in entry:
            raise ValueError(f"'{path}': dataset '{name}' needs at least 'images' and 'classes'")
        unknown = set(entry) - {"images", "labels", "classes", "label_suffix"}
        if unknown:
            raise KeyError(f"'{path}': dataset '{name}' has unknown keys {sorted(unknown)}")
        classes = entry["classes"]
        register_image_folder(
            name,
            resolve(entry["images"]),
            resolve(classes) if isinstance(classes, str) else classes,
            resolve(entry.get("labels") or ""),
            entry.get("label_suffix") or "",
        )
    return list(spec)
