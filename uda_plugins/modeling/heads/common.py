"""Building blocks shared by the decode heads."""

from __future__ import annotations

from torch import nn

from ..norm import get_norm

__all__ = ["ConvNormAct", "DepthwiseSeparableConv"]


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
