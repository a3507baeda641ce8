"""The DeepLab-V2 classifier: one 3x3 conv to the classes per dilation on the deepest feature, summed.

Follows DAFormer's ``DLV2Head`` (lhoyer/MIC ``seg/mmseg/models/decode_heads/dlv2_head.py``): no shared convs,
weights initialised N(0, 0.01). Output stride is the backbone's (8 for the dilated ResNets). ``DROPOUT`` is a
channel dropout (``Dropout2d``) of the deepest feature before the classifier, as DUDA's ``DeepLabV2Decoder``
(parquets/DUDA ``models/decoders/deeplabv2_decoder.py:6-15``, 0.5 in its config); DAFormer's head has none
(``dlv2_head.py`` forces ``dropout_ratio`` 0), so its configs set 0.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from uda_plugins.d2 import SEM_SEG_HEADS_REGISTRY, CfgNode, ShapeSpec

__all__ = ["DeepLabV2Head"]


@SEM_SEG_HEADS_REGISTRY.register()
class DeepLabV2Head(nn.Module):
    def __init__(self, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> None:
        super().__init__()
        h = cfg.MODEL.SEM_SEG_HEAD
        self.in_feature = h.IN_FEATURES[-1]
        in_ch = input_shape[self.in_feature].channels
        self.common_stride = input_shape[self.in_feature].stride
        self.dropout = nn.Dropout2d(h.DROPOUT) if h.DROPOUT > 0 else nn.Identity()
        self.aspp = nn.ModuleList(nn.Conv2d(in_ch, h.NUM_CLASSES, 3, padding=d, dilation=d) for d in h.ASPP_DILATIONS)
        for conv in self.aspp:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.dropout(features[self.in_feature])
        return sum(conv(x) for conv in self.aspp)
