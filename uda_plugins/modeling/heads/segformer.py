"""The SegFormer all-MLP head (Xie et al. 2021): per-level linear embedding, upsampling to the finest level,
concatenation, a 1x1 fusion conv (norm + ReLU), dropout and a 1x1 classifier. Output stride 4 on MiT. Initialised as
mmcv 1.3.7 initialises mmseg's ``SegFormerHead`` (:func:`~uda_plugins.modeling.heads.common.init_like_mmcv_`)."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from uda_plugins.d2 import SEM_SEG_HEADS_REGISTRY, CfgNode, ShapeSpec

from .common import ConvNormAct, init_like_mmcv_

__all__ = ["SegFormerHead", "upsample_and_concat"]


def upsample_and_concat(embedded: list) -> torch.Tensor:
    """Bilinearly resize every map to the first (finest) one's size and concatenate along channels."""
    size = embedded[0].shape[-2:]
    return torch.cat(
        [
            e if e.shape[-2:] == size else F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            for e in embedded
        ],
        dim=1,
    )


@SEM_SEG_HEADS_REGISTRY.register()
class SegFormerHead(nn.Module):
    def __init__(self, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> None:
        super().__init__()
        h = cfg.MODEL.SEM_SEG_HEAD
        self.in_features = list(h.IN_FEATURES)
        dim = h.EMBED_DIM
        self.embed = nn.ModuleDict({f: nn.Conv2d(input_shape[f].channels, dim, 1) for f in self.in_features})
        self.fuse = ConvNormAct(dim * len(self.in_features), dim, 1, norm=h.NORM)
        self.dropout = nn.Dropout2d(h.DROPOUT)
        self.classifier = nn.Conv2d(dim, h.NUM_CLASSES, 1)
        self.common_stride = input_shape[self.in_features[0]].stride
        init_like_mmcv_(self, self.classifier)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = upsample_and_concat([self.embed[f](features[f]) for f in self.in_features])
        return self.classifier(self.dropout(self.fuse(x)))
