"""The CoaST/ProDA classifier MCL uses for every head (feifei-cv/MCL ``models/deeplabv2.py``,
``Classifier_Module2``): on the deepest feature, a 1x1 branch and one 3x3 branch per dilation (6, 12, 18, 24), each
``SEM_SEG_HEAD.EMBED_DIM`` (256) channels with GroupNorm(32) and ReLU, concatenated; a squeeze-and-excitation block
(reduction 16); a 3x3 conv back to EMBED_DIM with GroupNorm; Dropout2d; a 1x1 conv to the classes without bias.

Initialisation as released (``deeplabv2.py:171-191`` then ``:247-250``): the head's own loop over its branches
finds only ``nn.Sequential`` members, so it initialises nothing there; its bottleneck loop gives the 3x3 conv a zero
bias (the SE block's linear layers, inside a module of their own, keep torch's default); then the ResNet101
constructor sets the weight of every conv of the network to N(0, 0.01). So the weights are N(0, 0.01), the branch
convs keep torch's default bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the bottleneck conv's bias is 0 and the
classifier has none.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from uda_plugins.d2 import SEM_SEG_HEADS_REGISTRY, CfgNode, ShapeSpec

from ..norm import get_norm

__all__ = ["MultiScaleSEHead", "SqueezeExcitation"]


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]


@SEM_SEG_HEADS_REGISTRY.register()
class MultiScaleSEHead(nn.Module):
    def __init__(self, cfg: CfgNode, input_shape: Dict[str, ShapeSpec], in_channels: int = 0) -> None:
        """``in_channels`` overrides the deepest feature's width (MCL's ensemble head reads T features stacked)."""
        super().__init__()
        h = cfg.MODEL.SEM_SEG_HEAD
        self.in_feature = h.IN_FEATURES[-1]
        self.common_stride = input_shape[self.in_feature].stride
        in_ch = in_channels or input_shape[self.in_feature].channels
        width = h.EMBED_DIM
        kernels = [(1, 1)] + [(3, d) for d in h.ASPP_DILATIONS]
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_ch, width, k, padding=d if k == 3 else 0, dilation=d), get_norm("GN", width), nn.ReLU()
            )
            for k, d in kernels
        )
        self.bottleneck = nn.Sequential(
            SqueezeExcitation(width * len(kernels)),
            nn.Conv2d(width * len(kernels), width, 3, padding=1),
            get_norm("GN", width),
        )
        self.dropout = nn.Dropout2d(h.DROPOUT)
        self.classifier = nn.Conv2d(width, h.NUM_CLASSES, 1, bias=False)
        nn.init.zeros_(self.bottleneck[1].bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = features[self.in_feature]
        x = self.bottleneck(torch.cat([b(x) for b in self.branches], dim=1))
        return self.classifier(self.dropout(x))
