"""Resize / random crop / flip with the applied geometry recorded, so it can be replayed.

A :class:`Geometry` is plain data (ints and a bool) stored in each mapped dict under ``"geometry"``. Replaying it
on another array — a second view of the image, a pseudo-label map read from disk, teacher logits computed on the
full image — gives pixel-aligned results: :func:`apply_geometry` works on numpy arrays (data workers) and
:func:`apply_geometry_tensor` on torch tensors (the device).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .labels import IGNORE_LABEL

__all__ = [
    "Geometry",
    "fit_scale",
    "resized_size",
    "sample_geometry",
    "apply_geometry",
    "apply_geometry_tensor",
    "resize_image",
    "resize_label",
]


@dataclass(frozen=True)
class Geometry:
    """What was done to an image of ``orig_size``: resize to ``resized_size``, crop the box ``crop`` =
    (top, left, height, width) of the resized image, then flip horizontally if ``flip``."""

    orig_size: Tuple[int, int]
    resized_size: Tuple[int, int]
    crop: Tuple[int, int, int, int]
    flip: bool

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(d: dict) -> "Geometry":
        return Geometry(tuple(d["orig_size"]), tuple(d["resized_size"]), tuple(d["crop"]), bool(d["flip"]))

    @property
    def output_size(self) -> Tuple[int, int]:
        return self.crop[2], self.crop[3]


def fit_scale(size: Sequence[int], target: Sequence[int]) -> float:
    """The scale that makes an image of ``size`` (h, w) fit inside ``target`` (h, w) keeping its aspect ratio;
    1 for a ``target`` of (0, 0). For landscape images this is mmseg's keep_ratio rule."""
    if not target or (target[0] <= 0 and target[1] <= 0):
        return 1.0
    h, w = size
    return min(target[0] / h, target[1] / w)


def resized_size(size: Sequence[int], scale: float) -> Tuple[int, int]:
    return max(1, int(size[0] * scale + 0.5)), max(1, int(size[1] * scale + 0.5))


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    if tuple(image.shape[:2]) == tuple(size):
        return image
    return cv2.resize(image, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size: Sequence[int]) -> np.ndarray:
    if tuple(label.shape[:2]) == tuple(size):
        return label
    return cv2.resize(label, (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST)


def _crop_ok(label_crop: np.ndarray, cat_max_ratio: float, ignore_label: int) -> bool:
    values, counts = np.unique(label_crop, return_counts=True)
    counts = counts[values != ignore_label]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def _class_pixels_in_crop(label: np.ndarray, geometry: Geometry, class_id: int) -> int:
    top, left, ch, cw = geometry.crop
    return int(
        np.count_nonzero(resize_label(label, geometry.resized_size)[top : top + ch, left : left + cw] == class_id)
    )


def sample_geometry(
    rng: np.random.Generator,
    size: Sequence[int],
    *,
    resize: Sequence[int] = (0, 0),
    ratio_range: Sequence[float] = (1.0, 1.0),
    crop_size: Sequence[int] = (0, 0),
    cat_max_ratio: float = 1.0,
    flip_prob: float = 0.0,
    label: Optional[np.ndarray] = None,
    ignore_label: int = IGNORE_LABEL,
    required_class: Optional[int] = None,
    required_pixels: float = 0.0,
    max_redraws: int = 10,
) -> Geometry:
    """Draw a resize (fit ``resize`` x a factor in ``ratio_range``), a random crop of ``crop_size`` (re-drawn up
    to 10 times while one class dominates, when ``label`` is given and ``cat_max_ratio`` < 1) and a flip.

    Rare-class sampling: with ``required_class`` (and ``label``), the whole draw is repeated up to ``max_redraws``
    more times until the crop holds more than ``required_pixels`` pixels of that class, counted on the label as
    resized and cropped; the last draw is kept even if it misses. This is lhoyer/MIC
    ``seg/mmseg/datasets/uda_dataset.py`` ``get_rare_class_sample``, which re-runs the whole source pipeline
    (random resize, cat_max_ratio crop, flip) on the same file up to 10 times. Without ``required_class`` the
    random draws are exactly those of a single attempt.
    """
    h, w = int(size[0]), int(size[1])
    attempts = 1 + max(0, int(max_redraws)) if required_class is not None and label is not None else 1
    for _ in range(attempts):
        scale = fit_scale((h, w), resize) * float(rng.uniform(ratio_range[0], ratio_range[1]))
        rh, rw = resized_size((h, w), scale)
        if crop_size[0] > 0 and crop_size[1] > 0:
            ch, cw = min(int(crop_size[0]), rh), min(int(crop_size[1]), rw)
            resized_label = resize_label(label, (rh, rw)) if label is not None and cat_max_ratio < 1.0 else None
            for _ in range(10):
                top, left = int(rng.integers(0, rh - ch + 1)), int(rng.integers(0, rw - cw + 1))
                if resized_label is None or _crop_ok(
                    resized_label[top : top + ch, left : left + cw], cat_max_ratio, ignore_label
                ):
                    break
            crop = (top, left, ch, cw)
        else:
            crop = (0, 0, rh, rw)
        flip = bool(rng.uniform() < flip_prob)
        geometry = Geometry((h, w), (rh, rw), crop, flip)
        if attempts == 1 or _class_pixels_in_crop(label, geometry, required_class) > required_pixels:
            break
    return geometry


def apply_geometry(array: np.ndarray, geometry: Geometry, is_label: bool) -> np.ndarray:
    """Replay ``geometry`` on an HxW or HxWxC numpy array (labels: nearest, images: bilinear) covering the original
    image, at its size or another (a pseudo-label map stored at a lower resolution is resized straight to the
    geometry's ``resized_size``, as :func:`apply_geometry_tensor` does)."""
    out = (resize_label if is_label else resize_image)(array, geometry.resized_size)
    top, left, ch, cw = geometry.crop
    out = out[top : top + ch, left : left + cw]
    if geometry.flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def apply_geometry_tensor(tensor: torch.Tensor, geometry: Geometry, mode: str = "bilinear") -> torch.Tensor:
    """Replay ``geometry`` on a (..., H, W) tensor covering the original image — teacher logits or soft
    pseudo-labels on the device, possibly at a lower resolution than the image (it is resized to the
    geometry's ``resized_size`` first, exactly like the numpy path). ``mode``: "bilinear" for continuous maps,
    "nearest" for class maps (integer tensors keep their dtype)."""
    lead, (H, W) = tensor.shape[:-2], tensor.shape[-2:]
    x = tensor.reshape(1, -1, H, W)
    is_int = not torch.is_floating_point(x)
    if tuple(geometry.resized_size) != (H, W):
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        x = F.interpolate(x.float() if is_int else x, size=tuple(geometry.resized_size), mode=mode, **kwargs)
        if is_int:
            x = x.round().to(tensor.dtype)
    top, left, ch, cw = geometry.crop
    x = x[..., top : top + ch, left : left + cw]
    if geometry.flip:
        x = x.flip(-1)
    return x.reshape(*lead, ch, cw)
