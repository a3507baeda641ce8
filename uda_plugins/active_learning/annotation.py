"""Who labels the selected images, and the image lists a round writes.

An annotator turns a round's selection into label files:

* :class:`GroundTruthAnnotator` reveals the dataset's own labels (the simulation every active-learning paper runs,
  ILM-ASSL included: its selected Cityscapes images get their ground truth);
* :class:`FolderAnnotator` is for people: the round's list goes into a folder, the annotators drop one label PNG
  per image there (named like the image, e.g. ``aachen/aachen_000000_000019_leftImg8bit.png``, or just its file
  name), and each file is checked before it is used (readable, one channel of 8 bits, the image's size, only known
  class ids or the ignore value). Until every label is there, :meth:`FolderAnnotator.labels` raises
  :class:`AnnotationPending` naming what is missing.

The image lists themselves are :mod:`uda_plugins.data.image_lists`.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import cv2
import numpy as np

from uda_plugins.data.image_lists import image_keys, write_image_list

__all__ = ["AnnotationPending", "GroundTruthAnnotator", "FolderAnnotator"]


class AnnotationPending(RuntimeError):
    """The folder does not hold every label of a round yet."""


class GroundTruthAnnotator:
    """Reveals the dataset's own label file of each selected image."""

    def request(self, round_index: int, dicts: Sequence[dict], indices: Sequence[int]) -> None:
        pass

    def labels(self, round_index: int, dicts: Sequence[dict], indices: Sequence[int]) -> Dict[int, str]:
        out = {}
        for i in indices:
            path = dicts[i].get("sem_seg_file_name")
            if not path:
                raise ValueError(
                    f"'{dicts[i]['file_name']}' has no ground truth to reveal: the ground-truth annotator needs a "
                    "labelled target dataset (or use the folder annotator)"
                )
            out[i] = path
        return out


class FolderAnnotator:
    """Labels that people drop into ``folder``: :meth:`request` writes ``round<k>_to_label.txt`` there;
    :meth:`labels` checks and returns the files once all are present."""

    def __init__(self, folder: str, num_classes: int, ignore_value: int = 255) -> None:
        self.folder = folder
        self.num_classes = num_classes
        self.ignore_value = ignore_value

    def request_file(self, round_index: int) -> str:
        return os.path.join(self.folder, f"round{round_index}_to_label.txt")

    def request(self, round_index: int, dicts: Sequence[dict], indices: Sequence[int]) -> None:
        write_image_list(self.request_file(round_index), dicts, indices)

    def _candidates(self, key: str) -> List[str]:
        stem = os.path.splitext(key)[0]
        return [os.path.join(self.folder, stem + ".png"), os.path.join(self.folder, os.path.basename(stem) + ".png")]

    def labels(self, round_index: int, dicts: Sequence[dict], indices: Sequence[int]) -> Dict[int, str]:
        keys = image_keys(dicts)
        found, missing = {}, []
        for i in indices:
            path = next((p for p in self._candidates(keys[i]) if os.path.isfile(p)), None)
            if path is None:
                missing.append(self._candidates(keys[i])[0])
            else:
                found[i] = path
        if missing:
            raise AnnotationPending(
                f"{len(missing)} of the {len(indices)} images of round {round_index} have no label in "
                f"'{self.folder}' yet (e.g. '{missing[0]}'); the list is {self.request_file(round_index)}"
            )
        for i, path in found.items():
            self.check(path, dicts[i])
        return found

    def check(self, path: str, record: dict) -> None:
        """Fail with one line naming ``path`` unless it is a valid label of the image ``record`` describes."""
        label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if label is None:
            raise ValueError(f"Label '{path}' is not a readable image")
        if label.ndim != 2 or label.dtype != np.uint8:
            raise ValueError(
                f"Label '{path}' must have one 8-bit channel of class ids, not {label.shape} {label.dtype}"
            )
        size = (record.get("height"), record.get("width"))
        if None in size:
            image = cv2.imread(record["file_name"], cv2.IMREAD_UNCHANGED)
            size = image.shape[:2]
        if tuple(label.shape) != tuple(size):
            raise ValueError(f"Label '{path}' is {label.shape[1]}x{label.shape[0]}, its image {size[1]}x{size[0]}")
        values = np.unique(label)
        bad = [int(v) for v in values if v >= self.num_classes and v != self.ignore_value]
        if bad:
            raise ValueError(
                f"Label '{path}' has class ids {bad} outside 0..{self.num_classes - 1} (ignore: {self.ignore_value})"
            )
