"""Teacher pseudo-labels and their pixel weights (DACS / DAFormer / HRDA / MIC).

Follows lhoyer/MIC ``seg/mmseg/models/uda/dacs.py`` (``get_pseudo_label_and_weight``,
``filter_valid_pseudo_region``) and ``seg/mmseg/datasets/cityscapes.py`` (the ``valid_pseudo_mask`` with
``crop_pseudo_margins``). The quality weight stays a device tensor: no host sync in the step (the reference calls
``.item()``).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from uda_plugins.data.transforms import Geometry, apply_geometry_tensor
from uda_plugins.modeling import class_maximum

__all__ = ["pseudo_labels_from_logits", "ignore_crop_rows", "frame_margin_mask"]


def pseudo_labels_from_logits(
    logits: torch.Tensor, threshold: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher logits (N, C, H, W) -> hard labels (N, H, W), confidence (N, H, W) and the pixel weight (N, H, W):
    the fraction of pixels of the whole batch whose confidence is >= ``threshold``, broadcast to every pixel
    (DACS's pseudo-label quality weight)."""
    probs = torch.softmax(logits.detach().float(), dim=1)
    confidence, labels = class_maximum(probs)
    quality = (confidence >= threshold).float().mean()
    return labels, confidence, quality.expand_as(confidence).clone()


def ignore_crop_rows(weight: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
    """DAFormer's "croppl": zero the weight of the first ``top`` and last ``bottom`` rows of every crop (in place)."""
    if top > 0:
        weight[:, :top, :] = 0
    if bottom > 0:
        weight[:, -bottom:, :] = 0
    return weight


def frame_margin_mask(geometries: Sequence[dict], margins: Sequence[int], device: torch.device) -> torch.Tensor:
    """HRDA/MIC's ``valid_pseudo_mask``: 1 inside the original frame minus ``margins`` = (top, bottom, left, right)
    pixels, 0 in the margins, carried through each sample's recorded resize/crop/flip -> (N, h, w) float."""
    top, bottom, left, right = (int(m) for m in margins)
    out = []
    for g in geometries:
        geometry = Geometry.from_dict(g)
        H, W = geometry.orig_size
        mask = torch.zeros((1, H, W), device=device)
        mask[:, top : H - bottom, left : W - right] = 1
        out.append(apply_geometry_tensor(mask, geometry, mode="nearest")[0])
    return torch.stack(out)
