"""Segmentation losses with the reference code's conventions."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_AVERAGES",
    "upsample_like",
    "seg_cross_entropy",
    "symmetric_cross_entropy",
    "entropy_regularizer",
    "kld_uniform_regularizer",
]


def upsample_like(logits: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) logits to ``size`` (align_corners=False, as mmseg's ``resize``; True as
    DeepLab-era code such as DUDA's ``UpsamplePredictor``)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)


LOSS_AVERAGES = ("all_pixels", "labelled_pixels")


def seg_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    pixel_weight: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    average: str = "all_pixels",
) -> torch.Tensor:
    """Per-pixel cross-entropy of ``logits`` (resized to the label size) against ``target`` (N, H, W),
    optionally times ``pixel_weight`` (N, H, W), averaged over ``average``: "all_pixels" — ignored pixels contribute
    0 but count in the denominator, as mmseg's CrossEntropyLoss in the DACS/DAFormer/MIC code (docs/methods.md §0) —
    or "labelled_pixels", as torch's ``CrossEntropyLoss(ignore_index=...)`` (DUDA; 0, not NaN, without any)."""
    logits = upsample_like(logits, target.shape[-2:])
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    if pixel_weight is not None:
        loss = loss * pixel_weight
    if average == "labelled_pixels":
        return loss.sum() / (target != ignore_index).sum().clamp(min=1)
    if average != "all_pixels":
        raise ValueError(f"Unknown loss average '{average}' ({', '.join(LOSS_AVERAGES)})")
    return loss.mean()


def symmetric_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ce_weight: float = 0.2,
    rce_weight: float = 1.0,
    log_clamp: float = 1e-4,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Symmetric cross-entropy (Wang et al. 2019) as DUDA's ``SymmetricCrossEntropyLoss2d``
    (parquets/DUDA ``models/losses/seg_loss.py``): ``ce_weight * CE + rce_weight * RCE``; CE is averaged over the
    labelled pixels (torch's), RCE = -sum_c p_c log(clamp(onehot_c, log_clamp, 1)) with p clamped to [1e-7, 1],
    averaged over the labelled pixels too (both 0 when none is labelled). Logits are resized to the label size."""
    logits = upsample_like(logits, target.shape[-2:]).float()
    valid = target != ignore_index
    # torch's mean over the labelled pixels, but 0 (not NaN) for a crop without any
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").sum() / valid.sum().clamp(min=1)
    probs = torch.softmax(logits, dim=1).clamp(min=1e-7, max=1.0)
    # log(clamp(onehot)) is 0 at the label and log(log_clamp) elsewhere.
    p_label = probs.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    rce = -torch.log(torch.tensor(log_clamp, device=logits.device)) * (probs.sum(1) - p_label)
    rce = (rce * valid).sum() / (valid.sum() + 1e-6)
    return ce_weight * ce + rce_weight * rce


def entropy_regularizer(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """IAST's entropy regulariser as in DUDA's ``ent_reg_loss``: sum over the pixels with weight > 0 of the pixel
    entropy (log(p + 1e-8)) times the weight, divided by (number of such pixels) x C; 0 when there are none."""
    logits = upsample_like(logits, weight.shape[-2:]).float()
    probs = torch.softmax(logits, dim=1)
    entropy = -(probs * torch.log(probs + 1e-8)).sum(1)
    count = (weight > 0).sum() * logits.shape[1]
    return (entropy * weight).sum() / count.clamp(min=1)


def kld_uniform_regularizer(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """IAST's KL regulariser as in DUDA's ``kld_reg_loss``: sum over the pixels with weight > 0 of
    sum_c (-1/C) log softmax_c times the weight, divided by (number of such pixels) x C (KL(uniform || p) up to a
    constant); 0 when there are none."""
    logits = upsample_like(logits, weight.shape[-2:]).float()
    C = logits.shape[1]
    kld = (-1.0 / C) * torch.log_softmax(logits, dim=1).sum(1)
    count = (weight > 0).sum() * C
    return (kld * weight).sum() / count.clamp(min=1)
