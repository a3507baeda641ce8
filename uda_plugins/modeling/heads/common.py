"""Building blocks shared by the decode heads."""

from __future__ import annotations

from torch import nn

from ..norm import get_norm

__all__ = ["ConvNormAct", "DepthwiseSeparableConv", "init_like_mmcv_"]


class ConvNormAct(nn.Sequential):
    """conv -> norm -> ReLU (mmcv's ConvModule); the conv has no bias when a norm follows."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm: str = "BN",
        act: bool = True,
    ) -> None:
        padding = dilation * (kernel // 2)
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, groups=groups, bias=not norm),
            get_norm(norm, out_ch),
            nn.ReLU(inplace=True) if act else nn.Identity(),
        )


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise kxk ConvNormAct then pointwise 1x1 ConvNormAct (mmcv's DepthwiseSeparableConvModule)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, dilation: int = 1, norm: str = "BN") -> None:
        super().__init__(
            ConvNormAct(in_ch, in_ch, kernel, dilation=dilation, groups=in_ch, norm=norm),
            ConvNormAct(in_ch, out_ch, 1, norm=norm),
        )


def init_like_mmcv_(head: nn.Module, classifier: nn.Conv2d) -> None:
    """Initialise a decode head as mmseg/mmcv 1.3.7 do for DAFormer's, SegFormer's and HRDA's attention heads.

    * every :class:`ConvNormAct` (mmcv's ``ConvModule``): ``kaiming_init`` of the conv, i.e. normal, ``fan_out``,
      gain of ReLU, bias 0 (mmcv ``cnn/bricks/conv_module.py`` L163, L172-191, ``cnn/utils/weight_init.py``
      L60-65; mmcv applies ReLU's gain even to a ConvModule without activation), and the norm at weight 1, bias 0;
    * the classifier (mmseg's ``conv_seg``): N(0, 0.01), bias 0 (``decode_heads/decode_head.py`` L72-73
      ``init_cfg``, applied by ``model.init_weights()`` in ``tools/train.py``).

    The per-level embeddings (mmseg's ``MLP``, an ``nn.Linear``; here a 1x1 conv) keep PyTorch's default, which is
    ``nn.Linear``'s too (kaiming-uniform with a = sqrt(5) on ``fan_in``, the same bias bound). PyTorch's default
    for the convs would give the depthwise 3x3 convs 13x mmcv's spread and the pointwise ones a fifth of it
    (docs/release-audit/foundations-dacs-daformer-hrda-mic.md, A2)."""
    for module in head.modules():
        if isinstance(module, ConvNormAct):
            conv, norm = module[0], module[1]
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            if getattr(norm, "weight", None) is not None:
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
    nn.init.normal_(classifier.weight, 0.0, 0.01)
    nn.init.zeros_(classifier.bias)
