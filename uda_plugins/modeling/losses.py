"""Segmentation losses with the reference code's conventions."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["upsample_like", "seg_cross_entropy"]


def upsample_like(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) logits to ``size`` (align_corners=False, as mmseg's ``resize``)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def seg_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, pixel_weight: Optional[torch.Tensor] = None, ignore_index: int = 255
) -> torch.Tensor:
    """Per-pixel cross-entropy of ``logits`` (resized to the label size) against ``target`` (N, H, W),
    optionally times ``pixel_weight`` (N, H, W), averaged over **all** pixels — ignored pixels contribute 0 but
    count in the denominator, as mmseg's CrossEntropyLoss in the DACS/DAFormer/MIC code (docs/methods.md §0)."""
    logits = upsample_like(logits, target.shape[-2:])
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    if pixel_weight is not None:
        loss = loss * pixel_weight
    return loss.mean()
