"""Reinhard et al.'s colour transfer (L*a*b* mean and standard deviation) on the device, batched.

MCL (feifei-cv/MCL ``color.py``, ``color_transfer``) re-colours an image of one domain with the L*a*b* statistics of
an image of another, per image pair, with OpenCV on the CPU: 8-bit BGR -> L*a*b*, per channel
``(x - mean_content) * std_style / std_content + mean_style``, clipped, back to BGR. This is the same computation on
(N, 3, H, W) RGB tensors in 0..255 on any device, in floating point: sRGB -> linear -> XYZ (D65, OpenCV's matrix)
-> L*a*b*, the transfer, clamping L* to [0, 100] and a*, b* to [-128, 127] (OpenCV's 8-bit range), and back. It
differs from OpenCV's only by OpenCV's 8-bit rounding of the intermediate L*a*b* image and the release's truncating
casts: measured on the release's images (docs/release-audit, M10), 0.95 grey levels on average, 6 at the 99th
percentile. :func:`opencv_color_transfer` is the release's own computation (``UDA.MCL.COLOR_TRANSFER
opencv_uint8``), on the CPU, image by image.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = ["rgb_to_lab", "lab_to_rgb", "lab_color_transfer", "opencv_color_transfer"]

_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])
_EPS, _KAPPA = 0.008856, 903.3


def _srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(min=0)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in 0..255 -> L*a*b* (L* in 0..100)."""
    linear = _srgb_to_linear(rgb.float() / 255.0)
    xyz = torch.einsum("ij,njhw->nihw", _RGB_TO_XYZ.to(rgb.device), linear) / _WHITE.to(rgb.device)[:, None, None]
    f = torch.where(xyz > _EPS, xyz.clamp(min=1e-12) ** (1 / 3), (_KAPPA * xyz + 16) / 116)
    lightness = torch.where(xyz[:, 1] > _EPS, 116 * f[:, 1] - 16, _KAPPA * xyz[:, 1])
    return torch.stack([lightness, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_lab`, clamped to 0..255."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f**3 > _EPS, f**3, (116 * f - 16) / _KAPPA)
    xyz = xyz * _WHITE.to(lab.device)[:, None, None]
    linear = torch.einsum("ij,njhw->nihw", torch.linalg.inv(_RGB_TO_XYZ).to(lab.device), xyz)
    return (_linear_to_srgb(linear) * 255.0).clamp(0, 255)


def lab_color_transfer(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """``content`` (N, 3, H, W, RGB 0..255) re-coloured with the per-image L*a*b* mean and standard deviation of
    ``style`` (N, 3, H', W'): MCL's ``color_transfer(style, content)``. Returns float RGB in 0..255."""
    c, s = rgb_to_lab(content), rgb_to_lab(style)
    c_mean, c_std = c.mean((2, 3), keepdim=True), c.std((2, 3), unbiased=False, keepdim=True)
    s_mean, s_std = s.mean((2, 3), keepdim=True), s.std((2, 3), unbiased=False, keepdim=True)
    out = (c - c_mean) * (s_std / (c_std + 1e-30)) + s_mean
    out = torch.cat([out[:, :1].clamp(0, 100), out[:, 1:].clamp(-128, 127)], dim=1)
    return lab_to_rgb(out)


def _release_uint8_bgr(rgb: torch.Tensor) -> np.ndarray:
    """An RGB 0..255 image (3, H, W) as the release casts its float32 x/255 tensors:
    ``(np.float64(x) * 255.0).astype(np.uint8)``, which keeps an 8-bit value and truncates any other (RandAugment's
    views are not always whole levels)."""
    scaled = (rgb.detach().float().cpu() / 255.0).double().numpy().transpose(1, 2, 0)[:, :, ::-1] * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _opencv_transfer(style_bgr: np.ndarray, content_bgr: np.ndarray) -> np.ndarray:
    """feifei-cv/MCL ``color.py:8-71`` (``color_transfer(source=style, target=content)``) on uint8 BGR images."""
    style = cv2.cvtColor(style_bgr, cv2.COLOR_BGR2LAB).astype("float32")
    content = cv2.cvtColor(content_bgr, cv2.COLOR_BGR2LAB).astype("float32")
    out = []
    for c in range(3):
        s, t = style[:, :, c], content[:, :, c]
        out.append(np.clip((s.std() / (t.std() + 1e-30)) * (t - t.mean()) + s.mean(), 0, 255))
    return cv2.cvtColor(cv2.merge(out).astype("uint8"), cv2.COLOR_LAB2BGR)


def opencv_color_transfer(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """:func:`lab_color_transfer` as MCL releases it (``adaptation_modelv2.py:347-355``, ``image_style``): each pair
    cast to 8-bit BGR, OpenCV's 8-bit L*a*b* transfer, the result truncated to uint8. Returns float RGB in 0..255
    on ``content``'s device."""
    styled = [
        _opencv_transfer(_release_uint8_bgr(s), _release_uint8_bgr(c))[:, :, ::-1].transpose(2, 0, 1)
        for c, s in zip(content, style)
    ]
    return torch.from_numpy(np.ascontiguousarray(np.stack(styled))).float().to(content.device)
