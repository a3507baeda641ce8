"""DeepLab-V3+ as U2PL and ILM-ASSL build it, with U2PL's representation branch and auxiliary head.

Follows licongguan/ILM-ASSL ``core/models/decoder.py`` (``dec_deeplabv3_plus``, ``Aux_Module``) and
``core/models/base.py`` (``ASPP``), U2PL's code:

* ASPP on the deepest feature: image pooling, a 1x1 and three 3x3 dilated (12, 24, 36) branches of EMBED_DIM (256)
  channels with norm + ReLU, concatenated; a 3x3 conv to CONVS_DIM (256) + norm + ReLU + dropout;
* upsampled to the low-level feature (``IN_FEATURES[0]``, ResNet's layer1) and concatenated with its 1x1 conv to
  CONVS_DIM channels;
* the classifier (two 3x3 convs of CONVS_DIM with norm, ReLU, dropout; a 1x1 to the classes) and, beside it, the
  *representation* (the same, ending in a 1x1 to CONVS_DIM channels) that U2PL's contrastive loss reads
  (:meth:`DeepLabV3PlusHead.forward_with_representation`).

The reference hard-codes the decoder's width, 256; here it is ``MODEL.SEM_SEG_HEAD.CONVS_DIM``, Detectron2's key for
a decoder's conv width (its default is 128, so the U2PL configs set 256), so a small model can have a small decoder:
at stride 4 the decoder's 3x3 convs cost more than a small encoder.

:class:`AuxiliaryHead` is U2PL's ``Aux_Module`` (a 3x3 conv to 256, norm, ReLU, dropout 0.1, a 1x1 to the classes),
on ResNet's layer3 (1024 channels for ResNet-101), trained with weight 0.4.

Deviations: feature maps are resized with align_corners=False (the reference: True), and convolutions followed by a
norm have no bias (the reference's classifier convs have one, which the norm cancels).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from uda_plugins.d2 import SEM_SEG_HEADS_REGISTRY, CfgNode, ShapeSpec

from .common import ConvNormAct

__all__ = ["DeepLabV3PlusHead", "AuxiliaryHead"]


class _ImagePooling(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, norm: str) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_ch, out_ch, 1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(F.adaptive_avg_pool2d(x, 1))
        return pooled.expand(-1, -1, *x.shape[-2:])


def _branch(in_ch: int, width: int, out_ch: int, norm: str, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        ConvNormAct(in_ch, width, 3, norm=norm),
        nn.Dropout2d(dropout),
        ConvNormAct(width, width, 3, norm=norm),
        nn.Dropout2d(dropout),
        nn.Conv2d(width, out_ch, 1),
    )


@SEM_SEG_HEADS_REGISTRY.register()
class DeepLabV3PlusHead(nn.Module):
    def __init__(self, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> None:
        super().__init__()
        h = cfg.MODEL.SEM_SEG_HEAD
        if len(h.IN_FEATURES) != 2:
            raise ValueError(
                f"DeepLabV3PlusHead reads a low-level and the deepest feature: MODEL.SEM_SEG_HEAD.IN_FEATURES must "
                f"name two, e.g. ['res2', 'res5'], not {list(h.IN_FEATURES)}"
            )
        self.in_features = list(h.IN_FEATURES)
        low, deep = (input_shape[name] for name in self.in_features)
        self.common_stride = low.stride
        width, dim, norm = h.EMBED_DIM, h.CONVS_DIM, h.NORM
        self.aspp = nn.ModuleList(
            [_ImagePooling(deep.channels, width, norm), ConvNormAct(deep.channels, width, 1, norm=norm)]
            + [ConvNormAct(deep.channels, width, 3, dilation=d, norm=norm) for d in h.ASPP_DILATIONS]
        )
        self.bottleneck = nn.Sequential(ConvNormAct(width * len(self.aspp), dim, 3, norm=norm), nn.Dropout2d(h.DROPOUT))
        self.low_level = ConvNormAct(low.channels, dim, 1, norm=norm)
        self.classifier = _branch(2 * dim, dim, h.NUM_CLASSES, norm, h.DROPOUT)
        self.representation = _branch(2 * dim, dim, dim, norm, h.DROPOUT)
        self.representation_dim = dim

    def _fused(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        low, deep = (features[name] for name in self.in_features)
        x = self.bottleneck(torch.cat([branch(deep) for branch in self.aspp], dim=1))
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([self.low_level(low), x], dim=1)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self._fused(features))

    def forward_with_representation(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, ``representation_dim``-channel representation) at the low-level feature's stride."""
        fused = self._fused(features)
        return self.classifier(fused), self.representation(fused)


class AuxiliaryHead(nn.Sequential):
    """U2PL's auxiliary classifier on an intermediate feature."""

    def __init__(self, in_channels: int, num_classes: int, norm: str = "BN", dropout: float = 0.1) -> None:
        super().__init__(
            ConvNormAct(in_channels, 256, 3, norm=norm), nn.Dropout2d(dropout), nn.Conv2d(256, num_classes, 1)
        )
