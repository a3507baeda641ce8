"""The DAFormer decoder (Hoyer et al. 2022): per-level linear embeddings upsampled to the finest level, then a
context-aware fusion — parallel depthwise-separable convs with several dilations (1x1 for dilation 1), each with
norm + ReLU, concatenated and fused by a 3x3 conv — then dropout and a 1x1 classifier.

Follows ``DAFormerHead`` with its published decoder_params (``embed_cfg=mlp``, ``fusion_cfg=aspp, sep=True,
dilations=(1, 6, 12, 18), pool=False``) in lhoyer/MIC ``seg/mmseg/models/decode_heads/daformer_head.py``, initialised
as mmcv 1.3.7 initialises it (:func:`~uda_plugins.modeling.heads.common.init_like_mmcv_`).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from uda_plugins.d2 import SEM_SEG_HEADS_REGISTRY, CfgNode, ShapeSpec

from .common import ConvNormAct, DepthwiseSeparableConv, init_like_mmcv_
from .segformer import upsample_and_concat

__all__ = ["DAFormerHead", "ContextAwareFusion"]


class ContextAwareFusion(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dilations, norm: str) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            ConvNormAct(in_ch, out_ch, 1, norm=norm) if d == 1 else DepthwiseSeparableConv(in_ch, out_ch, 3, d, norm)
            for d in dilations
        )
        self.bottleneck = ConvNormAct(out_ch * len(dilations), out_ch, 3, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([b(x) for b in self.branches], dim=1))


@SEM_SEG_HEADS_REGISTRY.register()
class DAFormerHead(nn.Module):
    def __init__(self, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> None:
        super().__init__()
        h = cfg.MODEL.SEM_SEG_HEAD
        self.in_features = list(h.IN_FEATURES)
        dim = h.EMBED_DIM
        self.embed = nn.ModuleDict({f: nn.Conv2d(input_shape[f].channels, dim, 1) for f in self.in_features})
        self.fuse = ContextAwareFusion(dim * len(self.in_features), dim, h.FUSION_DILATIONS, h.NORM)
        self.dropout = nn.Dropout2d(h.DROPOUT)
        self.classifier = nn.Conv2d(dim, h.NUM_CLASSES, 1)
        self.common_stride = input_shape[self.in_features[0]].stride
        init_like_mmcv_(self, self.classifier)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = upsample_and_concat([self.embed[f](features[f]) for f in self.in_features])
        return self.classifier(self.dropout(self.fuse(x)))
