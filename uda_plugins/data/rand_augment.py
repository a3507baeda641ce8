"""FixMatch's RandAugment as MCL uses it for its strong target views, on device tensors, with the geometric part
replayable on a label map at any resolution.

Follows feifei-cv/MCL@b91c947 ``data/randaugment.py`` (``RandAugmentMC(n=2, m=10)``, ``fixmatch_augment_pool``) with
PIL's operations (``ImageOps``, ``ImageEnhance``, ``Image.transform``/``rotate``) as its image semantics. One draw for
one image:

1. a horizontal flip with probability 0.5;
2. ``n`` operations drawn with replacement from the FixMatch pool, each with a magnitude v ~ U{1, ..., m-1} and
   applied with probability 0.5; shears, translations and rotations get a random sign;
3. a grey (127) Cutout square of side min(H, W) // 3, its centre uniform in the image, clipped at the border.

The image is kept in 8 bits between operations, as PIL's is. Geometric operations sample like PIL (pixel
centres, the output pixel (x, y) reads the input at the affine image of (x + 0.5, y + 0.5)), bilinear for images
with grey outside, nearest for labels.

Deviation (a fix; MCL's M6 and M13 in docs/release-audit/duda-mcl.md): the reference warps the pseudo-label by
replaying the transforms in a fixed order (flip, shears, translations, rotation, cutout) with the last value of each
kind, through its own matrices (``affine_sample``, ``randaugment.py:255-280``). On a 2:1 label its shears and
rotations match PIL's exactly; its defect is TranslateX, whose offset is normalised by the height instead of the
width (``theta[0,2] * 2 / H``, ``:274``), so the label moves W/H = 2x as far as the image (measured: 15% class
agreement with the image's warp), and two geometric operations that do not commute (Rotate then ShearX: 42%) are
replayed in the wrong order. About 7% of strong views draw TranslateX and 3% two geometric operations. Here the
label sees exactly the image's transforms, in the image's order, composed into one map (98-100% agreement); no
switch reproduces the release's warp. The reference's Cutout also covers one more row and column than its box
(``randaugment.py:54``, PIL's inclusive rectangle; M12): here the box itself.

Random numbers come from torch's global generator (seeded per iteration by the trainer), so a resumed run draws
the same augmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

__all__ = ["RandAugmentDraw", "FIXMATCH_POOL", "sample_rand_augment", "apply_rand_augment", "warp_label"]

GREY = 127
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")

# name: (max_v, bias) as in ``fixmatch_augment_pool`` (None: the operation has no magnitude).
FIXMATCH_POOL = {
    "AutoContrast": None,
    "Brightness": (0.9, 0.05),
    "Color": (0.9, 0.05),
    "Contrast": (0.9, 0.05),
    "Equalize": None,
    "Identity": None,
    "Posterize": (4, 4),
    "Rotate": (30, 0),
    "Sharpness": (0.9, 0.05),
    "ShearX": (0.3, 0),
    "ShearY": (0.3, 0),
    "Solarize": (256, 0),
    "TranslateX": (0.3, 0),
    "TranslateY": (0.3, 0),
}
_INTEGER_MAGNITUDE = ("Posterize", "Rotate", "Solarize")
_SIGNED = GEOMETRIC
_PARAMETER_MAX = 10


@dataclass
class RandAugmentDraw:
    """One image's draw: ``ops`` are (name, value) in the order applied (value: the PIL argument, e.g. a brightness
    factor, a shear, a translation in pixels, degrees), ``cutout`` the grey box (x0, y0, x1, y1) in pixels."""

    size: Tuple[int, int]  # (H, W) of the image it was drawn for
    flip: bool = False
    ops: List[Tuple[str, float]] = field(default_factory=list)
    cutout: Optional[Tuple[int, int, int, int]] = None


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def sample_rand_augment(size: Sequence[int], n: int = 2, m: int = 10, cutout: bool = True) -> RandAugmentDraw:
    """Draw ``RandAugmentMC(n, m)`` for an image of ``size`` (H, W)."""
    if n < 1 or not 2 <= m <= _PARAMETER_MAX:
        raise ValueError(f"RandAugment needs n >= 1 and 2 <= m <= 10 (magnitudes are drawn from 1..m-1), got {n}, {m}")
    H, W = int(size[0]), int(size[1])
    draw = RandAugmentDraw((H, W), flip=bool(torch.rand(()) < 0.5))
    names = list(FIXMATCH_POOL)
    for k in torch.randint(len(names), (n,)).tolist():
        name = names[k]
        v = int(torch.randint(1, m, ()))
        if not bool(torch.rand(()) < 0.5):
            continue
        spec = FIXMATCH_POOL[name]
        if spec is None:
            value = 0.0
        else:
            max_v, bias = spec
            value = (
                int(v * max_v / _PARAMETER_MAX) if name in _INTEGER_MAGNITUDE else v * max_v / _PARAMETER_MAX
            ) + bias
        if name in _SIGNED and bool(torch.rand(()) < 0.5):
            value = -value
        if name == "TranslateX":
            value = int(value * W)
        elif name == "TranslateY":
            value = int(value * H)
        elif name == "Solarize":
            value = 256 - value  # the threshold
        draw.ops.append((name, float(value)))
    if cutout:
        side = min(H, W) // 3
        x0, y0 = _uniform(0, W), _uniform(0, H)
        x0, y0 = int(max(0, x0 - side / 2.0)), int(max(0, y0 - side / 2.0))
        draw.cutout = (x0, y0, int(min(W, x0 + side)), int(min(H, y0 + side)))
    return draw


# ------------------------------------------------------------------------------------------------- geometry
def _op_matrix(name: str, value: float, size: Tuple[int, int]) -> torch.Tensor:
    """The 3x3 map from an output pixel position to the input position PIL samples, in the image's pixels."""
    H, W = size
    m = torch.eye(3, dtype=torch.float64)
    if name == "Flip":
        m[0, 0], m[0, 2] = -1.0, W
    elif name == "ShearX":
        m[0, 1] = value
    elif name == "ShearY":
        m[1, 0] = value
    elif name == "TranslateX":
        m[0, 2] = value
    elif name == "TranslateY":
        m[1, 2] = value
    elif name == "Rotate":  # Image.rotate: counter-clockwise by ``value`` degrees about the centre
        a = -math.radians(value)
        cos, sin = round(math.cos(a), 15), round(math.sin(a), 15)
        cx, cy = W / 2.0, H / 2.0
        m[0, :] = torch.tensor([cos, sin, cx - cos * cx - sin * cy], dtype=torch.float64)
        m[1, :] = torch.tensor([-sin, cos, cy + sin * cx - cos * cy], dtype=torch.float64)
    else:
        raise ValueError(f"'{name}' is not a geometric operation")
    return m


def _geometry(draw: RandAugmentDraw) -> List[Tuple[str, float]]:
    return ([("Flip", 0.0)] if draw.flip else []) + [(n, v) for n, v in draw.ops if n in GEOMETRIC]


def _source_positions(matrix: torch.Tensor, out_size: Tuple[int, int], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Input positions (x, y), each (H, W), that the output pixels' centres map to."""
    H, W = out_size
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=torch.float64, device=device) + 0.5,
        torch.arange(W, dtype=torch.float64, device=device) + 0.5,
        indexing="ij",
    )
    m = matrix.to(device)
    return m[0, 0] * xs + m[0, 1] * ys + m[0, 2], m[1, 0] * xs + m[1, 1] * ys + m[1, 2]


def _warp_image(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Bilinear warp of a (3, H, W) uint8 image, grey outside (``Image.transform(..., BILINEAR, fillcolor=grey)``)."""
    H, W = image.shape[-2:]
    x, y = _source_positions(matrix, (H, W), image.device)
    grid = torch.stack([2 * x / W - 1, 2 * y / H - 1], dim=-1)[None].float()
    shifted = image[None].float() - GREY
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] + GREY
    return out.round().clamp(0, 255).to(torch.uint8)


def _photometric(image: torch.Tensor, name: str, value: float) -> torch.Tensor:
    if name == "Identity":
        return image
    if name == "AutoContrast":
        return TF.autocontrast(image)
    if name == "Equalize":
        return TF.equalize(image)
    if name == "Brightness":
        return TF.adjust_brightness(image, value)
    if name == "Color":
        return TF.adjust_saturation(image, value)
    if name == "Contrast":
        return TF.adjust_contrast(image, value)
    if name == "Sharpness":
        return TF.adjust_sharpness(image, value)
    if name == "Posterize":
        return TF.posterize(image, int(value))
    if name == "Solarize":
        return TF.solarize(image, value)
    raise ValueError(f"Unknown RandAugment operation '{name}'")


def apply_rand_augment(image: torch.Tensor, draw: RandAugmentDraw) -> torch.Tensor:
    """The strong view of one (3, H, W) RGB image (uint8, or float in 0..255) on its device; returns uint8."""
    if tuple(image.shape[-2:]) != draw.size:
        raise ValueError(f"A RandAugment draw for {draw.size} applied to an image of {tuple(image.shape[-2:])}")
    out = image.round().clamp(0, 255).to(torch.uint8) if torch.is_floating_point(image) else image
    if draw.flip:
        out = out.flip(-1)
    for name, value in draw.ops:
        if name in GEOMETRIC:
            out = _warp_image(out, _op_matrix(name, value, draw.size))
        else:
            out = _photometric(out, name, value)
    if draw.cutout is not None:
        x0, y0, x1, y1 = draw.cutout
        out = out.clone()
        out[:, y0:y1, x0:x1] = GREY
    return out


def warp_label(label: torch.Tensor, draw: RandAugmentDraw, fill: int) -> torch.Tensor:
    """The image's geometric transforms (flip, shears, translations, rotations, cutout) replayed on a (h, w) class
    map covering the same view at any resolution (MCL: a quarter of the image's), nearest, ``fill`` outside and
    under the cutout. Each label pixel's centre is traced back through the operations, last first, in the image's
    pixels; it gets ``fill`` if it leaves the frame at any stage (what the image shows grey there)."""
    h, w = label.shape[-2:]
    H, W = draw.size
    sx, sy = w / W, h / H
    out = label
    geometry = _geometry(draw)
    if geometry:
        ys, xs = torch.meshgrid(
            (torch.arange(h, dtype=torch.float64, device=label.device) + 0.5) / sy,
            (torch.arange(w, dtype=torch.float64, device=label.device) + 0.5) / sx,
            indexing="ij",
        )
        inside = torch.ones_like(xs, dtype=torch.bool)
        for name, value in reversed(geometry):
            m = _op_matrix(name, value, draw.size).to(label.device)
            xs, ys = m[0, 0] * xs + m[0, 1] * ys + m[0, 2], m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
            inside &= (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
        xi = torch.floor(xs * sx).long().clamp(0, w - 1)  # PIL's nearest
        yi = torch.floor(ys * sy).long().clamp(0, h - 1)
        out = torch.where(inside, label[yi, xi], torch.full_like(label, fill))
    if draw.cutout is not None:
        x0, y0, x1, y1 = draw.cutout
        out = out.clone()
        # The reference scales the box by integer division (``int(x // scale)``).
        out[int(y0 * sy) : int(y1 * sy), int(x0 * sx) : int(x1 * sx)] = fill
    return out
