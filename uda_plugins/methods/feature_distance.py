"""DAFormer's thing-class ImageNet feature distance (FD): keep the student's bottleneck features close to those
of the frozen initial (ImageNet) encoder on source pixels of "thing" classes.

Follows lhoyer/MIC ``seg/mmseg/models/uda/dacs.py`` (``calc_feat_dist``, ``masked_feat_dist``) and
``seg/mmseg/models/utils/dacs_transforms.py`` (``downscale_label_ratio``): per feature cell the L2 norm of the
feature difference, averaged over cells whose down-scaled source label is one of the classes (a cell takes a
class only when at least ``scale_min_ratio`` of its pixels have it). With HRDA the features are the context
scale's, so the frozen encoder sees the image at ``Segmentor.feature_scale``.

One fix: the reference averages an empty selection to NaN when a batch has no thing cell; here that loss is 0.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["downscale_label_ratio", "FeatureDistance"]


def downscale_label_ratio(
    labels: torch.Tensor, scale_factor: int, min_ratio: float, num_classes: int, ignore_label: int = 255
) -> torch.Tensor:
    """(N, H, W) labels -> (N, H // s, W // s): the majority class of each s x s cell, or ``ignore_label`` when
    the majority covers less than ``min_ratio`` of the cell (ignored pixels vote for "ignore")."""
    assert scale_factor >= 1
    x = labels.clone()
    x[x == ignore_label] = num_classes
    one_hot = F.one_hot(x, num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, out = F.avg_pool2d(one_hot, kernel_size=scale_factor).max(dim=1)
    out[out == num_classes] = ignore_label
    out[ratio < min_ratio] = ignore_label
    return out


class FeatureDistance(nn.Module):
    """Holds the frozen copy of the initial encoder (checkpointed with the model: on ``--resume`` the distance is
    still to the *initial* weights) and computes the weighted FD loss."""

    def __init__(
        self,
        encoder: nn.Module,
        weight: float,
        classes: Sequence[int],
        scale_min_ratio: float,
        feature: str,
        num_classes: int,
        ignore_label: int = 255,
    ) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder).eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.weight = weight
        self.register_buffer("classes", torch.tensor(list(classes), dtype=torch.long), persistent=False)
        self.scale_min_ratio = scale_min_ratio
        self.feature = feature
        self.num_classes = num_classes
        self.ignore_label = ignore_label

    def train(self, mode: bool = True) -> "FeatureDistance":
        super().train(mode)
        self.encoder.eval()  # the reference's imnet model always runs in eval mode
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor, student_feature: torch.Tensor) -> torch.Tensor:
        """``images``: the normalised input the student's ``student_feature`` (N, C, h, w) was computed from;
        ``labels``: (N, H, W) at the input resolution of the student."""
        with torch.no_grad():
            frozen = self.encoder(images)[self.feature].detach()
        if frozen.shape[-2:] != student_feature.shape[-2:]:
            raise ValueError(f"FD: frozen features {tuple(frozen.shape)} vs student {tuple(student_feature.shape)}")
        distance = torch.norm(student_feature.float() - frozen.float(), dim=1, p=2)  # (N, h, w)
        if len(self.classes) > 0:
            scale = labels.shape[-1] // student_feature.shape[-1]
            cells = downscale_label_ratio(labels, scale, self.scale_min_ratio, self.num_classes, self.ignore_label)
            cells = cells[..., : distance.shape[-2], : distance.shape[-1]]
            if cells.shape[-2:] != distance.shape[-2:]:
                # The label cells (side = label width // feature width) must tile the feature map; the release
                # fails here too (an IndexError in dacs.py's masked_feat_dist), where a broadcast would be silent.
                raise ValueError(
                    f"FD: label cells {tuple(cells.shape[-2:])} of {labels.shape[-1] // student_feature.shape[-1]} px "
                    f"do not cover the features {tuple(distance.shape[-2:])} (labels {tuple(labels.shape[-2:])})"
                )
            mask = torch.isin(cells, self.classes).float()
            loss = (distance * mask).sum() / mask.sum().clamp(min=1)
        else:
            loss = distance.mean()
        return self.weight * loss
