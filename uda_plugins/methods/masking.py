"""MIC's block masks: the image is cut into square blocks and each is dropped with probability ``ratio``.

Follows lhoyer/MIC ``seg/mmseg/models/utils/masking_transforms.py`` (``BlockMaskGenerator``): a grid of
``round(H / block) x round(W / block)`` cells, a cell kept iff U(0, 1) > ratio, nearest-upsampled to (H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["block_mask"]


def block_mask(n: int, height: int, width: int, block_size: int, ratio: float, device: torch.device) -> torch.Tensor:
    """(n, 1, height, width) float mask: 1 = kept, 0 = masked."""
    grid = (max(1, round(height / block_size)), max(1, round(width / block_size)))
    keep = (torch.rand((n, 1) + grid) > ratio).float().to(device)
    return F.interpolate(keep, size=(height, width), mode="nearest")
