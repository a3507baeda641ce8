"""timm encoders as Detectron2 Backbones: dilated ResNets (DeepLab) and MiT (SegFormer's encoder, built on timm's
``PyramidVisionTransformerV2``).

Both expose four outputs named ``res2..res5`` (shallow to deep) so the heads need not know which encoder they
sit on. The wrapped module is the plain timm model with its classifier pruned, so its parameter names are timm's
own: ImageNet weights from timm, torchvision (same ResNet names) or the original MiT/PVT release load directly;
mmseg/mmcv checkpoints are unwrapped and renamed (:func:`convert_state_dict`). Weights come only from the local
file in ``MODEL.BACKBONE.PRETRAINED``; nothing is downloaded.

``MODEL.TIMM.ARCH mit_b0..mit_b5`` is SegFormer's MiT-B0..B5, the encoder of DAFormer, HRDA and MIC: timm's
``PyramidVisionTransformerV2`` module with the release's hyper-parameters (:data:`MIT_ARCHS`), so SegFormer's
``mit_b*.pth`` and the mmseg checkpoints of MiT models load tensor for tensor. ``pvt_v2_b0..b5`` keep meaning timm's
PVTv2 models, which are *not* MiT-B0..B4: they have MLP ratios (8, 8, 4, 4) where MiT has 4 in every stage (MiT-B0:
hidden widths 256, 512, 640, 1024 instead of 128, 256, 640, 1024; 3.41M parameters instead of 3.32M). Only
``pvt_v2_b5`` is MiT-B5 (same modules, same state dict).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from functools import partial
from typing import Dict, List, NamedTuple, Tuple

import timm
import torch
from timm.layers import LayerNorm
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from torch import nn

from uda_plugins.d2 import BACKBONE_REGISTRY, Backbone, CfgNode, ShapeSpec

from ..norm import freeze_batch_norm, get_norm

__all__ = [
    "TimmBackbone",
    "build_dilated_resnet_backbone",
    "build_mit_backbone",
    "build_mit",
    "MIT_ARCHS",
    "load_pretrained",
    "convert_state_dict",
]

logger = logging.getLogger(__name__)

STAGE_NAMES = ("res2", "res3", "res4", "res5")


class TimmBackbone(Backbone):
    """A timm model's four stage outputs as a dict ``{res2..res5: tensor}``."""

    def __init__(self, model: nn.Module, indices: List[int], out_features: List[str]) -> None:
        super().__init__()
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"Unknown backbone outputs {unknown}; this backbone has {list(STAGE_NAMES)}")
        self.indices = list(indices)
        info = model.feature_info
        self._out_features = list(out_features)
        self._out_feature_channels = {n: info[i]["num_chs"] for n, i in zip(STAGE_NAMES, self.indices)}
        self._out_feature_strides = {n: info[i]["reduction"] for n, i in zip(STAGE_NAMES, self.indices)}
        model.prune_intermediate_layers(self.indices, prune_head=True)
        self.model = model

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return {n: f for n, f in zip(STAGE_NAMES, feats) if n in self._out_features}


class MitSpec(NamedTuple):
    """One MiT size: per-stage depths, widths and heads (what varies between MiT-B0..B5)."""

    depths: Tuple[int, int, int, int]
    embed_dims: Tuple[int, int, int, int]
    num_heads: Tuple[int, int, int, int] = (1, 2, 5, 8)


# SegFormer's MiT-B0..B5 as released (lhoyer/MIC seg/mmseg/models/backbones/mix_transformer.py:457-550, the classes
# mit_b0..mit_b5, from NVlabs/SegFormer). Common to all six (MIT_COMMON): MLP ratios 4 in every stage,
# spatial-reduction ratios (8, 4, 2, 1), qkv bias, block and stage LayerNorms with eps 1e-6 (the patch embeddings'
# and the spatial reduction's LayerNorms keep PyTorch's 1e-5, mix_transformer.py:78,177, as timm's do).
MIT_ARCHS: Dict[str, MitSpec] = {
    "mit_b0": MitSpec(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256)),
    "mit_b1": MitSpec(depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512)),
    "mit_b2": MitSpec(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512)),
    "mit_b3": MitSpec(depths=(3, 4, 18, 3), embed_dims=(64, 128, 320, 512)),
    "mit_b4": MitSpec(depths=(3, 8, 27, 3), embed_dims=(64, 128, 320, 512)),
    "mit_b5": MitSpec(depths=(3, 6, 40, 3), embed_dims=(64, 128, 320, 512)),
}
MIT_COMMON = dict(
    mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1), qkv_bias=True, norm_layer=partial(LayerNorm, eps=1e-6)
)


def build_mit(arch: str, in_chans: int = 3, drop_path_rate: float = 0.0) -> PyramidVisionTransformerV2:
    """SegFormer's MiT encoder ``arch`` (mit_b0..mit_b5) as a timm ``PyramidVisionTransformerV2`` (timm's module
    names and methods, so timm's converter and feature API apply). Stochastic depth rises linearly from 0 to
    ``drop_path_rate`` over all blocks, as in the release (mix_transformer.py:255-257)."""
    if arch not in MIT_ARCHS:
        raise ValueError(f"Unknown MiT arch '{arch}'; one of {', '.join(MIT_ARCHS)}")
    spec = MIT_ARCHS[arch]._asdict()
    return PyramidVisionTransformerV2(in_chans=in_chans, drop_path_rate=drop_path_rate, **spec, **MIT_COMMON)


def _unwrap(checkpoint: dict) -> Dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(checkpoint, dict) and key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
    return checkpoint


def convert_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Rename an encoder checkpoint to ``model``'s (timm) parameter names.

    Handles: containers (``state_dict``/``model``), prefixes (``backbone.``, ``module.``, ``encoder.``),
    mmseg's ResNetV1c deep stem (``stem.{0,1,3,4,6,7}`` -> ``conv1.{0,1,3,4}``, ``conv1.6``, ``bn1``), the
    original MiT/PVTv2 names (timm's own ``checkpoint_filter_fn``), and drops classifier weights.
    """
    state_dict = _unwrap(state_dict)
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^(module\.|backbone\.|encoder\.)+", "", k)
        m = re.match(r"^stem\.(\d+)\.(.*)$", k)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            k = "bn1." + rest if idx == 7 else f"conv1.{idx}.{rest}"
        out[k] = v
    # timm's own converter from the original release's names (MiT / PVTv2); ResNets need none.
    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        out = filter_fn(out, model)
    return {k: v for k, v in out.items() if not re.match(r"^(fc|head|classifier)\.", k)}


def _check_shapes(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Fail naming the first tensors of ``state_dict`` whose shape differs from ``model``'s."""
    own = model.state_dict()
    wrong = [k for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if not wrong:
        return
    hint = ""
    if isinstance(model, PyramidVisionTransformerV2) and any(".mlp." in k for k in wrong):
        hint = (
            " (MiT-B0..B4, SegFormer's mit_b*.pth, are MODEL.TIMM.ARCH mit_b0..mit_b4; timm's pvt_v2_b0..b4 differ:"
            " MLP ratios 8, 8, 4, 4 where MiT has 4)"
        )
    examples = ", ".join(f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3])
    raise ValueError(
        f"'{path}' does not fit {type(model).__name__}: {len(wrong)} tensors have another shape (file vs model),"
        f" e.g. {examples}{hint}"
    )


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load encoder weights from a local file into the (unpruned) timm ``model``; every model parameter must be
    found with its shape, or this fails naming the file and the first missing or misshapen keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.BACKBONE.PRETRAINED file '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OSError(f"MODEL.BACKBONE.PRETRAINED file '{path}' could not be read ({e})") from None
    state_dict = convert_state_dict(checkpoint, model)
    own = {k for k in model.state_dict() if not re.match(r"^(fc|head|classifier)\.", k)}
    missing = sorted(own - set(state_dict))
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise KeyError(
            f"'{path}' does not fit {type(model).__name__}: {len(missing)} parameters are missing, e.g. {missing[:5]}"
        )
    _check_shapes(model, state_dict, path)
    unexpected = sorted(set(state_dict) - own)
    if unexpected:
        logger.warning(f"Ignoring {len(unexpected)} unexpected keys in '{path}', e.g. {unexpected[:5]}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    logger.info(f"Loaded ImageNet weights for {len(own)} encoder tensors from '{path}'")


def apply_multi_grid(stage: nn.Module, dilation: int, grid) -> None:
    """Dilate block i's 3x3 conv of ``stage`` by ``dilation * grid[i]`` (DeepLab-V3's multi-grid; padding alike)."""
    blocks = list(stage.children())
    if len(grid) != len(blocks):
        raise ValueError(
            f"MODEL.TIMM.MULTI_GRID {tuple(grid)} needs one factor per block of the last stage ({len(blocks)})"
        )
    for block, factor in zip(blocks, grid):
        conv = block.conv2
        conv.dilation = conv.padding = (dilation * int(factor),) * 2


RESNET_STYLES = ("pytorch", "caffe")


def apply_caffe_style(model: nn.Module, output_stride: int) -> None:
    """Make a timm ResNet the DeepLab-V2 "caffe" ResNet of AdaptSegNet, ADVENT, DUDA and MCL (parquets/DUDA
    ``models/backbones/resnet.py:62-72,136,170-195``; feifei-cv/MCL ``models/deeplabv2.py:57-100,211-229``): a
    stage's stride on the first block's 1x1 conv instead of its 3x3 conv, the stem max-pool with ``ceil_mode`` (a
    320x640 input gives 41x81 features at output stride 8, as MCL's, not 40x80), and every block of a dilated stage
    dilated, its first too (timm, like torchvision, gives the first block the previous stage's dilation). Weights are
    unchanged: a torchvision or timm checkpoint loads as it is."""
    if hasattr(model, "maxpool") and isinstance(model.maxpool, nn.MaxPool2d):
        model.maxpool.ceil_mode = True
    net_stride, dilation = 4, 1  # after the stem and its max-pool; timm's make_blocks rule for the stages' dilations
    for index, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        stride = 1 if index == 0 else 2
        if net_stride >= output_stride:
            dilation *= stride
        else:
            net_stride *= stride
        blocks = list(stage.children())
        first = blocks[0]
        if hasattr(first, "conv3") and first.conv2.stride != (1, 1):  # a bottleneck: the stride to its 1x1 conv
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
        for block in blocks:
            block.conv2.dilation = block.conv2.padding = (dilation, dilation)


@BACKBONE_REGISTRY.register()
def build_dilated_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> TimmBackbone:
    """A timm ResNet (``MODEL.TIMM.ARCH``) at ``MODEL.TIMM.OUTPUT_STRIDE`` (dilation instead of stride in the
    last stages), optionally with the v1c deep stem and custom widths/depths."""
    t = cfg.MODEL.TIMM
    if not t.ARCH.startswith("resnet"):
        raise ValueError(f"build_dilated_resnet_backbone needs a timm resnet arch, not '{t.ARCH}'")
    kwargs = dict(output_stride=t.OUTPUT_STRIDE, in_chans=input_shape.channels or 3, drop_path_rate=t.DROP_PATH_RATE)
    if t.STEM:
        kwargs.update(stem_type=t.STEM, stem_width=t.STEM_WIDTH)
    if t.CHANNELS:
        kwargs["channels"] = tuple(t.CHANNELS)
    if t.LAYERS:
        kwargs["layers"] = tuple(t.LAYERS)
    norm = cfg.MODEL.BACKBONE.NORM
    if norm in ("GN", "SyncBN"):
        # timm also passes device/dtype, which our norms take from the default (the model is moved later).
        kwargs["norm_layer"] = lambda c, **_: get_norm(norm, c)
    model = timm.create_model(t.ARCH, pretrained=False, **kwargs)
    if t.STYLE not in RESNET_STYLES:
        raise ValueError(f"MODEL.TIMM.STYLE '{t.STYLE}' is not one of {', '.join(RESNET_STYLES)}")
    if t.STYLE == "caffe":
        apply_caffe_style(model, t.OUTPUT_STRIDE)
    if t.MULTI_GRID:
        apply_multi_grid(model.layer4, 32 // t.OUTPUT_STRIDE, t.MULTI_GRID)
    if cfg.MODEL.BACKBONE.PRETRAINED:
        load_pretrained(model, cfg.MODEL.BACKBONE.PRETRAINED)
    if norm == "FrozenBN":
        model = freeze_batch_norm(model)
    return TimmBackbone(model, [1, 2, 3, 4], cfg.MODEL.BACKBONE.OUT_FEATURES)


@BACKBONE_REGISTRY.register()
def build_mit_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> TimmBackbone:
    """A MiT encoder (strides 4, 8, 16, 32): ``MODEL.TIMM.ARCH mit_b0..mit_b5`` is SegFormer's MiT-B0..B5
    (:func:`build_mit`); a timm ``pvt_v2_*`` arch is timm's PVTv2 model of that name (``pvt_v2_b5`` = MiT-B5, the
    others differ from MiT). Its norms are LayerNorms, so ``MODEL.BACKBONE.NORM`` does not apply."""
    t = cfg.MODEL.TIMM
    in_chans = input_shape.channels or 3
    if t.ARCH in MIT_ARCHS:
        model = build_mit(t.ARCH, in_chans=in_chans, drop_path_rate=t.DROP_PATH_RATE)
    elif t.ARCH.startswith("pvt_v2"):
        model = timm.create_model(t.ARCH, pretrained=False, in_chans=in_chans, drop_path_rate=t.DROP_PATH_RATE)
    else:
        raise ValueError(
            f"build_mit_backbone needs MODEL.TIMM.ARCH mit_b0..mit_b5 or a timm pvt_v2 arch, not '{t.ARCH}'"
        )
    if cfg.MODEL.BACKBONE.PRETRAINED:
        load_pretrained(model, cfg.MODEL.BACKBONE.PRETRAINED)
    return TimmBackbone(model, [0, 1, 2, 3], cfg.MODEL.BACKBONE.OUT_FEATURES)
