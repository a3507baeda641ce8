"""Image lists: text files naming some images of a dataset (labelled target images, an active-learning round).

One image per line, its path relative to the dataset's image folder (the common folder of its images). Reading one
matches each line to the dataset image whose path ends with it, so the authors' lists
(``leftImg8bit/train/aachen/aachen_..._leftImg8bit.png``) read as well.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

__all__ = ["image_keys", "write_image_list", "read_image_list"]


def image_keys(dicts: Sequence[dict]) -> List[str]:
    """Each image's path relative to the common folder of all the dataset's images."""
    paths = [os.path.abspath(d["file_name"]) for d in dicts]
    common = os.path.commonpath([os.path.dirname(p) for p in paths])
    return [os.path.relpath(p, common) for p in paths]


def write_image_list(path: str, dicts: Sequence[dict], indices: Sequence[int]) -> None:
    """Write the images ``indices`` of ``dicts`` as a list file (atomically)."""
    keys = image_keys(dicts)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keys[i] + "\n" for i in indices)
    os.replace(tmp, path)


def read_image_list(path: str, dicts: Sequence[dict]) -> List[int]:
    """The dataset indices of the images a list file names, in its order. Fails naming the first line that matches
    no image (or several)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image list '{path}' does not exist")
    by_suffix: Dict[str, List[int]] = {}
    normalised = [os.path.abspath(d["file_name"]).replace(os.sep, "/") for d in dicts]
    indices = []
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    for number, line in enumerate(lines, 1):
        suffix = "/" + line.replace(os.sep, "/").lstrip("/")
        if suffix not in by_suffix:
            by_suffix[suffix] = [i for i, p in enumerate(normalised) if p.endswith(suffix)]
        matches = by_suffix[suffix]
        if len(matches) != 1:
            what = "no image" if not matches else f"{len(matches)} images"
            raise ValueError(f"{path}:{number}: '{line}' matches {what} of the dataset")
        indices.append(matches[0])
    if len(set(indices)) != len(indices):
        raise ValueError(f"Image list '{path}' names an image twice")
    return indices
