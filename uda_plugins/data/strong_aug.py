"""DACS's strong photometric augmentation on device tensors, with parameters drawn first and applied second (so a
test can replay a draw, and a step can log what it drew).

Follows lhoyer/MIC ``seg/mmseg/models/utils/dacs_transforms.py`` (``color_jitter``, ``gaussian_blur``) and the
kornia 0.5.8 ``ColorJitter`` / ``GaussianBlur2d`` it calls:

* colour jitter, applied to the whole batch when a U(0, 1) draw exceeds ``skip_prob`` (0.2): per image a
  brightness offset b-1, contrast factor c, saturation factor s (b, c, s ~ U(1 - strength, 1 + strength)) and a
  hue shift h ~ U(-strength, strength) turns, in a random order, on the image denormalised to [0, 1] and clamped
  after every step (kornia's semantics);
* Gaussian blur, applied to the whole batch when a U(0, 1) draw exceeds 0.5: sigma ~ U(0.15, 1.15), an odd kernel
  of about 10% of each image side, reflect padding.

The release calls ``strong_transform`` in two ways, and ``per_image`` picks which one a draw reproduces:

* ``per_image=True``: once per image, as DACS's ClassMix does (``uda/dacs.py`` L400-409, and QuadMix's
  ``strongTransform_class_mix``): each call builds its own kornia ``ColorJitter``, which draws the order of the
  four steps per call (kornia 0.5.8 ``augmentation/random_generator.py`` L106), and draws its own sigma
  (``dacs_transforms.py`` L73), so both are per image;
* ``per_image=False``: once over the whole batch, as MIC's masked images (``uda/masking_consistency_module.py``
  L119-131): one order and one sigma for the batch (the jitter factors stay per image: kornia draws them per
  sample).

Random numbers come from torch's global generator (seeded per iteration by the trainer), so a resumed run
draws the same augmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["StrongAugParams", "sample_strong_aug", "apply_strong_aug", "blur_kernel_size"]


@dataclass
class StrongAugParams:
    """One draw of the strong augmentation for a batch of ``n`` images (tensors on the CPU, shape (n,))."""

    jitter: bool
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor  # (n, 4): per image, the order of the jitter steps (0 brightness, 1 contrast, 2 sat., 3 hue)
    blur: bool
    sigma: torch.Tensor


def sample_strong_aug(
    n: int,
    strength: float = 0.2,
    skip_prob: float = 0.2,
    blur: bool = True,
    generator: Optional[torch.Generator] = None,
    per_image: bool = True,
) -> StrongAugParams:
    """One draw for ``n`` images: the jitter and blur decisions for the batch, the jitter factors per image, and the
    order of the jitter steps and the blur sigma per image (``per_image``) or one for the batch (see the module
    docstring). ``blur=False`` never blurs."""
    u = torch.rand(2, generator=generator)
    factors = 1 + strength * (2 * torch.rand(3, n, generator=generator) - 1)
    hue = strength * (2 * torch.rand(n, generator=generator) - 1)
    draws = n if per_image else 1
    sigma = (0.15 + torch.rand(draws, generator=generator)).expand(n)
    order = torch.stack([torch.randperm(4, generator=generator) for _ in range(draws)]).expand(n, 4)
    return StrongAugParams(
        jitter=bool(u[0] > skip_prob),
        brightness=factors[0],
        contrast=factors[1],
        saturation=factors[2],
        hue=hue,
        order=order,
        blur=blur and bool(u[1] > 0.5),
        sigma=sigma,
    )


def apply_strong_aug(
    x: torch.Tensor, params: StrongAugParams, pixel_mean: torch.Tensor, pixel_std: torch.Tensor, bgr: bool = False
) -> torch.Tensor:
    """Augment a normalised (N, 3, H, W) batch (normalised with ``pixel_mean``/``pixel_std`` in 0..255 units, its
    channels in BGR order with ``bgr``: the colour jitter works on RGB)."""
    if params.jitter:
        rgb = ((x * pixel_std + pixel_mean) / 255.0).clamp(0, 1)
        rgb = color_jitter(rgb.flip(1) if bgr else rgb, params)
        rgb = rgb.flip(1) if bgr else rgb
        x = (rgb * 255.0 - pixel_mean) / pixel_std
    if params.blur:
        x = gaussian_blur(x, params.sigma.to(x.device))
    return x


# ------------------------------------------------------------------------------------------- colour jitter
def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def color_jitter(rgb: torch.Tensor, p: StrongAugParams) -> torch.Tensor:
    """The jitter of ``p`` on an (N, 3, H, W) RGB batch in [0, 1]; images that share an order are done together."""
    orders, group = torch.unique(p.order, dim=0, return_inverse=True)
    if len(orders) == 1:
        return _jitter_in_order(rgb, orders[0].tolist(), p.brightness, p.contrast, p.saturation, p.hue)
    out = torch.empty_like(rgb)
    for g, order in enumerate(orders.tolist()):
        index = (group == g).nonzero()[:, 0]
        out[index.to(rgb.device)] = _jitter_in_order(
            rgb[index.to(rgb.device)], order, p.brightness[index], p.contrast[index], p.saturation[index], p.hue[index]
        )
    return out


def _jitter_in_order(rgb: torch.Tensor, order, brightness, contrast, saturation, hue) -> torch.Tensor:
    steps = {
        0: lambda im: (im + _view(brightness - 1, im)).clamp(0, 1),
        1: lambda im: (im * _view(contrast, im)).clamp(0, 1),
        2: lambda im: _adjust_hsv(im, saturation=_view(saturation, im)),
        3: lambda im: _adjust_hsv(im, hue=_view(hue, im)),
    }
    for step in order:
        rgb = steps[step](rgb)
    return rgb


def _adjust_hsv(rgb: torch.Tensor, saturation=None, hue=None) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(rgb)
    if saturation is not None:
        s = (s * saturation[:, 0]).clamp(0, 1)
    if hue is not None:
        h = torch.remainder(h + hue[:, 0] * 2 * math.pi, 2 * math.pi)
    return _hsv_to_rgb(h, s, v)


def _rgb_to_hsv(rgb: torch.Tensor, eps: float = 1e-6):
    """kornia 0.5.8's rgb_to_hsv (``color/hsv.py`` L7, its eps 1e-6; later kornia uses 1e-8): hue in radians
    [0, 2pi), saturation and value in [0, 1]."""
    r, g, b = rgb.unbind(1)
    maxc, argmax = rgb.max(1)
    minc = rgb.amin(1)
    delta = maxc - minc
    s = delta / (maxc + eps)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(argmax == 0, bc - gc, torch.where(argmax == 1, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0) * 2 * math.pi
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h6 = h / (2 * math.pi) * 6
    i = torch.floor(h6) % 6
    f = h6 - torch.floor(h6)
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    i = i.long()
    r = torch.stack([v, q, p, p, t, v], 1).gather(1, i[:, None]).squeeze(1)
    g = torch.stack([t, v, v, q, p, p], 1).gather(1, i[:, None]).squeeze(1)
    b = torch.stack([p, p, t, v, v, q], 1).gather(1, i[:, None]).squeeze(1)
    return torch.stack([r, g, b], 1)


# -------------------------------------------------------------------------------------------------- blur
def blur_kernel_size(side: int) -> int:
    """The reference's odd kernel of about 10% of an image side: ceil(0.1*side), minus one when even."""
    c = math.ceil(0.1 * side)
    return max(1, int(math.floor(c - 0.5 + c % 2)))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (kornia's GaussianBlur2d, reflect border)."""
    n, c, H, W = x.shape
    ky, kx = blur_kernel_size(H), blur_kernel_size(W)

    def kernels(k: int) -> torch.Tensor:
        pos = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
        g = torch.exp(-(pos[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
        return g / g.sum(1, keepdim=True)  # (n, k)

    gy, gx = kernels(ky), kernels(kx)
    # Depthwise convolution with one kernel per (image, channel): fold the batch into the channels.
    y = x.reshape(1, n * c, H, W)
    y = F.pad(y, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
    wx = gx.repeat_interleave(c, 0).view(n * c, 1, 1, kx)
    wy = gy.repeat_interleave(c, 0).view(n * c, 1, ky, 1)
    y = F.conv2d(y, wx, groups=n * c)
    y = F.conv2d(y, wy, groups=n * c)
    return y.view(n, c, H, W)
