"""Resize / random crop / flip with the applied geometry recorded, so it can be replayed.

A :class:`GeometryRule` is how one domain's images are resized, scaled, cropped, padded and flipped
(``INPUT.SOURCE``, ``INPUT.TARGET``, ``INPUT.TEST``), with each release's variant a named option:

==========================  ===================================================================================
``RESIZE_MODE``             ``keep_ratio``: fit inside ``RESIZE`` keeping the aspect ratio (mmseg's keep_ratio:
                            DAFormer, HRDA, MIC); ``exact``: stretch to ``RESIZE`` whatever the aspect ratio
                            (MCL's ``img_size``, DUDA's ``resize``, ILM-ASSL's 2048x1024 source images).
``RATIO_SAMPLING``          the random scale factor in ``RATIO_RANGE`` (lo, hi): ``uniform`` (mmseg, DUDA, MCL);
                            ``split_at_one``: U(lo, 1) or U(1, hi) with probability 1/2 each (ILM-ASSL / U2PL
                            ``RandResize``).
``SIZE_ROUNDING``           a scaled side is ``round`` ed (mmcv's ``int(x + 0.5)``) or ``floor`` ed (``int(x)``:
                            DUDA, MCL, ILM-ASSL).
``CROP_PAD``                a crop larger than the scaled image is ``none`` (cut to the image: the batch may mix
                            sizes), padded at the ``bottom_right`` (mmseg's ``Pad`` after ``RandomCrop``) or
                            ``center`` ed (ILM-ASSL's ``Crop``, which pads before drawing the offset).
``INTERPOLATION``           images are resized ``bilinear`` (cv2, mmcv's default), ``lanczos`` (PIL's, which
                            widens its kernel when it shrinks, i.e. antialiases: DUDA's ``Image.ANTIALIAS``) or
                            ``pil_bilinear`` (PIL's ``BILINEAR``, which antialiases too: MCL's). Labels by nearest
                            neighbour: cv2's with ``bilinear``, PIL's with a PIL filter, as the releases that use
                            PIL (PIL samples the source pixel under each output pixel's centre, cv2 the one under
                            its top-left corner: up to half a source pixel apart).
``RESAMPLE_TWICE``          with ``exact``: resample to ``RESIZE``, then to the random scale (MCL and DUDA stretch
                            in the dataset, then scale in the augmentation), instead of once from the original.
==========================  ===================================================================================

A :class:`Geometry` is plain data (ints and a bool) stored in each mapped dict under ``"geometry"``. Replaying it
on another array — a second view of the image, a pseudo-label map read from disk, teacher logits computed on the
full image — gives pixel-aligned results: :func:`apply_geometry` works on numpy arrays (data workers) and
:func:`apply_geometry_tensor` on torch tensors (the device). A padded crop is a box that reaches outside the
resized image; the replay fills the outside with a pad value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .labels import IGNORE_LABEL

__all__ = [
    "Geometry",
    "GeometryRule",
    "RESIZE_MODES",
    "RATIO_SAMPLINGS",
    "SIZE_ROUNDINGS",
    "CROP_PADS",
    "INTERPOLATIONS",
    "fit_scale",
    "resized_size",
    "sample_geometry",
    "apply_geometry",
    "apply_geometry_tensor",
    "resize_image",
    "resize_label",
    "class_pixels_in_crop",
]

RESIZE_MODES = ("keep_ratio", "exact")
INTERPOLATIONS = ("bilinear", "lanczos", "pil_bilinear")
PIL_INTERPOLATIONS = ("lanczos", "pil_bilinear")
RATIO_SAMPLINGS = ("uniform", "split_at_one")
SIZE_ROUNDINGS = ("round", "floor")
CROP_PADS = ("none", "bottom_right", "center")


@dataclass(frozen=True)
class Geometry:
    """What was done to an image of ``orig_size``: resize to ``resized_size``, crop the box ``crop`` =
    (top, left, height, width) of the resized image, then flip horizontally if ``flip``. A box reaching outside
    the resized image (negative top/left, or past its end) means the crop was padded there."""

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

    @property
    def padded(self) -> bool:
        top, left, ch, cw = self.crop
        rh, rw = self.resized_size
        return top < 0 or left < 0 or top + ch > rh or left + cw > rw


def fit_scale(size: Sequence[int], target: Sequence[int]) -> float:
    """The scale that makes an image of ``size`` (h, w) fit inside ``target`` (h, w) keeping its aspect ratio;
    1 for a ``target`` of (0, 0). For landscape images this is mmseg's keep_ratio rule."""
    if not target or (target[0] <= 0 and target[1] <= 0):
        return 1.0
    h, w = size
    return min(target[0] / h, target[1] / w)


def _round_side(x: float, rounding: str) -> int:
    return max(1, int(x) if rounding == "floor" else int(x + 0.5))


def resized_size(size: Sequence[int], scale: float, rounding: str = "round") -> Tuple[int, int]:
    """``size`` (h, w) times ``scale``, each side rounded by ``rounding`` ("round": mmcv's ``int(x + 0.5)``;
    "floor": ``int(x)``, as DUDA, MCL and ILM-ASSL compute sizes)."""
    return _round_side(size[0] * scale, rounding), _round_side(size[1] * scale, rounding)


@dataclass(frozen=True)
class GeometryRule:
    """One domain's resize, random scale, crop, pad and flip (see the module docstring for the options)."""

    resize: Tuple[int, int] = (0, 0)
    resize_mode: str = "keep_ratio"
    ratio_range: Tuple[float, float] = (1.0, 1.0)
    ratio_sampling: str = "uniform"
    size_rounding: str = "round"
    crop_size: Tuple[int, int] = (0, 0)
    crop_pad: str = "bottom_right"
    interpolation: str = "bilinear"
    resample_twice: bool = False
    cat_max_ratio: float = 1.0
    flip_prob: float = 0.0
    key: str = "INPUT"  # the config node it came from, for messages

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("RESIZE_MODE", self.resize_mode, RESIZE_MODES),
            ("RATIO_SAMPLING", self.ratio_sampling, RATIO_SAMPLINGS),
            ("SIZE_ROUNDING", self.size_rounding, SIZE_ROUNDINGS),
            ("CROP_PAD", self.crop_pad, CROP_PADS),
            ("INTERPOLATION", self.interpolation, INTERPOLATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{self.key}.{name} '{value}' is not one of {', '.join(allowed)}")
        if self.ratio_sampling == "split_at_one" and not self.ratio_range[0] <= 1.0 <= self.ratio_range[1]:
            raise ValueError(
                f"{self.key}.RATIO_SAMPLING split_at_one needs RATIO_RANGE around 1, not {tuple(self.ratio_range)}"
            )

    @classmethod
    def from_config(cls, node, key: str = "INPUT") -> "GeometryRule":
        """From ``cfg.INPUT.SOURCE`` / ``TARGET`` (every key) or ``cfg.INPUT.TEST`` (the resize keys only)."""
        get = node.get
        return cls(
            resize=tuple(int(v) for v in get("RESIZE", (0, 0))),
            resize_mode=get("RESIZE_MODE", "keep_ratio"),
            ratio_range=tuple(float(v) for v in get("RATIO_RANGE", (1.0, 1.0))),
            ratio_sampling=get("RATIO_SAMPLING", "uniform"),
            size_rounding=get("SIZE_ROUNDING", "round"),
            crop_size=tuple(int(v) for v in get("CROP_SIZE", (0, 0))),
            crop_pad=get("CROP_PAD", "bottom_right"),
            interpolation=get("INTERPOLATION", "bilinear"),
            resample_twice=bool(get("RESAMPLE_TWICE", False)),
            cat_max_ratio=float(get("CROP_CAT_MAX_RATIO", 1.0)),
            flip_prob=float(get("FLIP_PROB", 0.0)),
            key=key,
        )

    @property
    def crops(self) -> bool:
        return self.crop_size[0] > 0 and self.crop_size[1] > 0

    def scaled_size(self, size: Sequence[int], factor: float = 1.0) -> Tuple[int, int]:
        """The size of an image of ``size`` after the resize and the random scale ``factor``."""
        if self.resize_mode == "exact" and self.resize[0] > 0 and self.resize[1] > 0:
            return resized_size(self.resize, factor, self.size_rounding)
        return resized_size(size, fit_scale(size, self.resize) * factor, self.size_rounding)

    def base_size(self, size: Sequence[int]) -> Tuple[int, int]:
        """The size without the random scale: test images, and the whole views teachers predict on."""
        return self.scaled_size(size, 1.0)

    def stretched(self, array: np.ndarray, is_label: bool) -> np.ndarray:
        """``array`` (an original image or label) as the geometry's replay starts from it: resampled to the base size
        first with ``RESAMPLE_TWICE`` (and ``exact``), else as it is."""
        if not (self.resample_twice and self.resize_mode == "exact"):
            return array
        size = self.base_size(array.shape[:2])
        return (
            resize_label(array, size, self.interpolation) if is_label else resize_image(array, size, self.interpolation)
        )

    def draw_factor(self, rng: np.random.Generator) -> float:
        lo, hi = self.ratio_range
        if self.ratio_sampling == "split_at_one":
            # U2PL / ILM-ASSL core/dataset/augmentation.py RandResize: below or above 1 with probability 1/2.
            below = rng.uniform() < 0.5
            u = float(rng.uniform())
            return lo + (1.0 - lo) * u if below else 1.0 + (hi - 1.0) * u
        return float(rng.uniform(lo, hi))

    def smallest_size(self, size: Sequence[int]) -> Tuple[int, int]:
        """The smallest scaled size an image of ``size`` can get (the factor at the bottom of the range)."""
        return self.scaled_size(size, self.ratio_range[0])

    def mixed_size_cause(self, examples: Dict[Tuple[int, int], str]) -> Optional[str]:
        """None when images of every original size in ``examples`` (size -> a file of that size) always come out
        of this rule at one size, so that any of them can share a batch; otherwise one line saying why not."""
        if self.crops and self.crop_pad != "none":
            return None
        if self.crops:
            for size, name in examples.items():
                small = self.smallest_size(size)
                if small[0] < self.crop_size[0] or small[1] < self.crop_size[1]:
                    return (
                        f"'{name}' ({size[0]}x{size[1]}) can be scaled to {small[0]}x{small[1]} ({self.key}.RESIZE "
                        f"{list(self.resize)}, RESIZE_MODE {self.resize_mode}, RATIO_RANGE {list(self.ratio_range)}), "
                        f"smaller than {self.key}.CROP_SIZE {list(self.crop_size)}, and {self.key}.CROP_PAD is none"
                    )
            return None
        if self.ratio_range[0] != self.ratio_range[1]:
            return f"{self.key}.RATIO_RANGE {list(self.ratio_range)} scales each image differently and there is no crop"
        out: Dict[Tuple[int, int], str] = {}
        for size, name in examples.items():
            out.setdefault(self.base_size(size), name)
        if len(out) > 1:
            (a, name_a), (b, name_b) = list(out.items())[:2]
            return (
                f"'{name_a}' comes out at {a[0]}x{a[1]} and '{name_b}' at {b[0]}x{b[1]} ({self.key}.RESIZE "
                f"{list(self.resize)}, RESIZE_MODE {self.resize_mode}) and there is no crop ({self.key}.CROP_SIZE)"
            )
        return None

    def _crop_box(self, rng: np.random.Generator, rh: int, rw: int) -> Tuple[int, int, int, int]:
        """Draw a crop of ``crop_size`` in an image of (rh, rw): (top, left, height, width), reaching outside the
        image where it is padded."""
        ch, cw = int(self.crop_size[0]), int(self.crop_size[1])
        if self.crop_pad == "none":
            ch, cw = min(ch, rh), min(cw, rw)
        # "center" (ILM-ASSL Crop): pad (pad // 2 before, the rest after), then draw the offset in the padded image.
        pad_top = max(ch - rh, 0) // 2 if self.crop_pad == "center" else 0
        pad_left = max(cw - rw, 0) // 2 if self.crop_pad == "center" else 0
        top = int(rng.integers(0, max(rh - ch, 0) + 1)) - pad_top
        left = int(rng.integers(0, max(rw - cw, 0) + 1)) - pad_left
        return top, left, ch, cw

    def sample(
        self,
        rng: np.random.Generator,
        size: Sequence[int],
        *,
        label: Optional[np.ndarray] = None,
        ignore_label: int = IGNORE_LABEL,
        required_class: Optional[int] = None,
        required_pixels: float = 0.0,
        max_redraws: int = 10,
    ) -> Geometry:
        """Draw a resize and a random scale, a random crop of ``crop_size`` (checked up to 10 times and re-drawn while
        one class dominates, when ``label`` is given and ``cat_max_ratio`` < 1, so at most 11 draws: mmseg's rule)
        and a flip.

        Rare-class sampling: with ``required_class`` (and ``label``), the whole draw is repeated up to
        ``max_redraws`` more times until the crop holds more than ``required_pixels`` pixels of that class, counted
        on the label as resized and cropped; the last draw is kept even if it misses. This is lhoyer/MIC
        ``seg/mmseg/datasets/uda_dataset.py`` ``get_rare_class_sample``, which re-runs the whole source pipeline
        (random resize, cat_max_ratio crop, flip) on the same file up to 10 times. Without ``required_class`` the
        random draws are exactly those of a single attempt."""
        h, w = int(size[0]), int(size[1])
        attempts = 1 + max(0, int(max_redraws)) if required_class is not None and label is not None else 1
        for _ in range(attempts):
            rh, rw = self.scaled_size((h, w), self.draw_factor(rng))
            if self.crops:
                resized_label = (
                    resize_label(label, (rh, rw), self.interpolation)
                    if label is not None and self.cat_max_ratio < 1.0
                    else None
                )
                crop = self._crop_box(rng, rh, rw)
                # mmseg's RandomCrop (transforms.py L548-559): up to 10 checks, each failure redrawing, so after 10
                # failed checks the 11th crop is kept unchecked.
                for _ in range(10 if resized_label is not None else 0):
                    if _crop_ok(_inside(resized_label, crop), self.cat_max_ratio, ignore_label):
                        break
                    crop = self._crop_box(rng, rh, rw)
            else:
                crop = (0, 0, rh, rw)
            flip = bool(rng.uniform() < self.flip_prob)
            geometry = Geometry((h, w), (rh, rw), crop, flip)
            if (
                attempts == 1
                or class_pixels_in_crop(label, geometry, required_class, self.interpolation) > required_pixels
            ):
                break
        return geometry


def resize_image(image: np.ndarray, size: Sequence[int], interpolation: str = "bilinear") -> np.ndarray:
    """An HxWxC uint8 image resized to ``size`` (h, w): "bilinear" (cv2, no antialiasing), "lanczos" (PIL's
    ``Image.LANCZOS``, formerly ``ANTIALIAS``) or "pil_bilinear" (PIL's ``Image.BILINEAR``)."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    if interpolation in PIL_INTERPOLATIONS:
        from PIL import Image

        resample = Image.LANCZOS if interpolation == "lanczos" else Image.BILINEAR
        return np.asarray(Image.fromarray(image).resize((int(size[1]), int(size[0])), resample))
    return cv2.resize(image, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size: Sequence[int], interpolation: str = "bilinear") -> np.ndarray:
    """An HxW label map resized to ``size`` (h, w) by nearest neighbour: PIL's (pixel centres) when
    ``interpolation`` is a PIL filter, else cv2's."""
    if tuple(label.shape[:2]) == tuple(size):
        return label
    if interpolation in PIL_INTERPOLATIONS:
        from PIL import Image

        as_pil = label if label.dtype == np.uint8 else label.astype(np.int32)
        return np.asarray(Image.fromarray(as_pil).resize((int(size[1]), int(size[0])), Image.NEAREST)).astype(
            label.dtype
        )
    return cv2.resize(label, (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST)


def _inside(array: np.ndarray, crop: Sequence[int]) -> np.ndarray:
    """The part of the box ``crop`` that lies inside ``array`` (no padding)."""
    top, left, ch, cw = crop
    return array[max(top, 0) : max(top + ch, 0), max(left, 0) : max(left + cw, 0)]


def _crop_ok(label_crop: np.ndarray, cat_max_ratio: float, ignore_label: int) -> bool:
    values, counts = np.unique(label_crop, return_counts=True)
    counts = counts[values != ignore_label]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def class_pixels_in_crop(label: np.ndarray, geometry: Geometry, class_id: int, interpolation: str) -> int:
    """The pixels of ``class_id`` in the crop ``geometry`` makes of ``label`` (an original label), before any flip."""
    resized = resize_label(label, geometry.resized_size, interpolation)
    return int(np.count_nonzero(_inside(resized, geometry.crop) == class_id))


def sample_geometry(rng: np.random.Generator, size: Sequence[int], *, rule: Optional[GeometryRule] = None, **kwargs):
    """:meth:`GeometryRule.sample` in one call: ``rule``, or a rule of the :class:`GeometryRule` fields among
    ``kwargs`` (``resize``, ``ratio_range``, ``crop_size``, ...); the other ``kwargs`` go to ``sample``."""
    fields = {f.name for f in dataclasses.fields(GeometryRule)}
    rule_fields = {k: v for k, v in kwargs.items() if k in fields}
    if rule is not None and rule_fields:
        raise TypeError("sample_geometry takes a rule or its fields, not both")
    rule = rule if rule is not None else GeometryRule(**rule_fields)
    return rule.sample(rng, size, **{k: v for k, v in kwargs.items() if k not in fields})


def _padded_crop_numpy(array: np.ndarray, crop: Sequence[int], pad_value) -> np.ndarray:
    top, left, ch, cw = crop
    h, w = array.shape[:2]
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return array[top : top + ch, left : left + cw]
    out = np.empty((ch, cw) + array.shape[2:], dtype=array.dtype)
    out[...] = pad_value
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + ch, h), min(left + cw, w)
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = array[y0:y1, x0:x1]
    return out


def apply_geometry(
    array: np.ndarray, geometry: Geometry, is_label: bool, pad_value=None, interpolation: str = "bilinear"
) -> np.ndarray:
    """Replay ``geometry`` on an HxW or HxWxC numpy array (images by ``interpolation``, labels by the nearest
    neighbour that goes with it: :func:`resize_label`) covering the
    original image, at its size or another (a pseudo-label map stored at a lower resolution is resized straight to
    the geometry's ``resized_size``, as :func:`apply_geometry_tensor` does). A padded crop is filled with
    ``pad_value`` (default: the ignore label for labels, 0 for images; a per-channel sequence for images)."""
    if is_label:
        out = resize_label(array, geometry.resized_size, interpolation)
    else:
        out = resize_image(array, geometry.resized_size, interpolation)
    if pad_value is None:
        pad_value = IGNORE_LABEL if is_label else 0
    out = _padded_crop_numpy(out, geometry.crop, pad_value)
    if geometry.flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def apply_geometry_tensor(
    tensor: torch.Tensor,
    geometry: Geometry,
    mode: str = "bilinear",
    pad_value: float = 0.0,
    align_corners: bool = False,
) -> torch.Tensor:
    """Replay ``geometry`` on a (..., H, W) tensor covering the original image — teacher logits or soft
    pseudo-labels on the device, possibly at a lower resolution than the image (it is resized to the
    geometry's ``resized_size`` first, exactly like the numpy path). ``mode``: "bilinear" for continuous maps,
    "nearest" for class maps (integer tensors keep their dtype). A padded crop is filled with ``pad_value``.
    ``align_corners`` for "bilinear" (False: mmseg's convention; True: DUDA's ``full2weak_logits``)."""
    lead, (H, W) = tensor.shape[:-2], tensor.shape[-2:]
    x = tensor.reshape(1, -1, H, W)
    is_int = not torch.is_floating_point(x)
    if tuple(geometry.resized_size) != (H, W):
        kwargs = {"align_corners": align_corners} if mode == "bilinear" else {}
        x = F.interpolate(x.float() if is_int else x, size=tuple(geometry.resized_size), mode=mode, **kwargs)
        if is_int:
            x = x.round().to(tensor.dtype)
    top, left, ch, cw = geometry.crop
    rh, rw = x.shape[-2:]
    if top < 0 or left < 0 or top + ch > rh or left + cw > rw:
        out = x.new_full((*x.shape[:-2], ch, cw), pad_value)
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + ch, rh), min(left + cw, rw)
        if y1 > y0 and x1 > x0:
            out[..., y0 - top : y1 - top, x0 - left : x1 - left] = x[..., y0:y1, x0:x1]
        x = out
    else:
        x = x[..., top : top + ch, left : left + cw]
    if geometry.flip:
        x = x.flip(-1)
    return x.reshape(*lead, ch, cw)
