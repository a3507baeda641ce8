"""Published DAFormer / HRDA / MIC checkpoints (mmsegmentation) -> this project's state dict.

The released checkpoints of lhoyer/DAFormer, lhoyer/HRDA and lhoyer/MIC are mmseg UDA models (``seg/mmseg/models/uda/
dacs.py``): ``model.*`` (the student segmentor), ``ema_model.*`` (the EMA teacher) and ``imnet_model.*`` (the frozen
ImageNet encoder of the feature distance); a plain segmentor checkpoint has ``backbone.*`` / ``decode_head.*`` at the
top. Module names follow that source (``seg/mmseg/models/``):

=====================================================================  =============================================
mmseg                                                                  here
=====================================================================  =============================================
``backbone.*`` (MiT: SegFormer's names; ResNetV1c: ``stem.*``)          ``backbone.model.*`` (timm, via
                                                                       :func:`~uda_plugins.modeling.backbones.timm_backbone.convert_state_dict`)
``decode_head.embed_layers.<i>.proj`` (DAFormerHead MLP, a Linear)      ``head.embed.res<i+2>`` (a 1x1 conv)
``decode_head.fuse_layer.aspp_modules.<k>.conv / .bn`` (dilation 1)     ``head.fuse.branches.<k>.0 / .1``
``...aspp_modules.<k>.depthwise_conv.conv / .bn``,                      ``head.fuse.branches.<k>.0.0 / .0.1``,
``...aspp_modules.<k>.pointwise_conv.conv / .bn`` (separable)            ``head.fuse.branches.<k>.1.0 / .1.1``
``decode_head.fuse_layer.bottleneck.conv / .bn``                        ``head.fuse.bottleneck.0 / .1``
``decode_head.fuse_layer.conv / .bn`` (HRDA attention: a 1x1 ConvModule) ``fuse.0 / .1``
``decode_head.conv_seg``                                                ``head.classifier``
``decode_head.aspp_modules.<i>.conv`` (DLV2Head)                        ``head.aspp.<i>``
``decode_head.head.*`` / ``decode_head.scale_attention.*`` (HRDAHead)   ``head.*`` / ``scale_attention_head.*``
=====================================================================  =============================================

and the prefixes ``model.`` -> ``student.``, ``ema_model.`` -> ``teacher.``, ``imnet_model.backbone.`` ->
``feature_distance.encoder.model.``. Every converted tensor must have the shape of the parameter it fills.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch
from torch import nn

from .backbones.timm_backbone import _unwrap, convert_state_dict

__all__ = ["convert_mmseg_checkpoint", "convert_head_key"]

_PREFIXES = (("model.", "student."), ("ema_model.", "teacher."), ("imnet_model.", "feature_distance.encoder."))

_HEAD_RULES = [
    (r"^embed_layers\.(\d+)\.proj\.(weight|bias)$", lambda m: f"embed.res{int(m[1]) + 2}.{m[2]}"),
    (r"^fuse_layer\.aspp_modules\.(\d+)\.conv\.(.+)$", lambda m: f"fuse.branches.{m[1]}.0.{m[2]}"),
    (r"^fuse_layer\.aspp_modules\.(\d+)\.bn\.(.+)$", lambda m: f"fuse.branches.{m[1]}.1.{m[2]}"),
    (r"^fuse_layer\.aspp_modules\.(\d+)\.depthwise_conv\.conv\.(.+)$", lambda m: f"fuse.branches.{m[1]}.0.0.{m[2]}"),
    (r"^fuse_layer\.aspp_modules\.(\d+)\.depthwise_conv\.bn\.(.+)$", lambda m: f"fuse.branches.{m[1]}.0.1.{m[2]}"),
    (r"^fuse_layer\.aspp_modules\.(\d+)\.pointwise_conv\.conv\.(.+)$", lambda m: f"fuse.branches.{m[1]}.1.0.{m[2]}"),
    (r"^fuse_layer\.aspp_modules\.(\d+)\.pointwise_conv\.bn\.(.+)$", lambda m: f"fuse.branches.{m[1]}.1.1.{m[2]}"),
    (r"^fuse_layer\.bottleneck\.conv\.(.+)$", lambda m: f"fuse.bottleneck.0.{m[1]}"),
    (r"^fuse_layer\.bottleneck\.bn\.(.+)$", lambda m: f"fuse.bottleneck.1.{m[1]}"),
    (r"^fuse_layer\.conv\.(.+)$", lambda m: f"fuse.0.{m[1]}"),
    (r"^fuse_layer\.bn\.(.+)$", lambda m: f"fuse.1.{m[1]}"),
    (r"^conv_seg\.(weight|bias)$", lambda m: f"classifier.{m[1]}"),
    (r"^aspp_modules\.(\d+)\.conv\.(weight|bias)$", lambda m: f"aspp.{m[1]}.{m[2]}"),
]


def convert_head_key(key: str) -> str:
    """An mmseg ``decode_head.`` key (without that prefix) -> this project's key under the segmentor, or "" for
    keys with no counterpart."""
    target = "head."
    for prefix, ours in (("head.", "head."), ("scale_attention.", "scale_attention_head.")):
        if key.startswith(prefix):
            key, target = key[len(prefix) :], ours
            break
    for pattern, rename in _HEAD_RULES:
        m = re.match(pattern, key)
        if m:
            return target + rename(m)
    return ""


def _convert_segmentor(state: Dict[str, torch.Tensor], network: nn.Module, prefix: str) -> Tuple[Dict, List[str]]:
    """One mmseg segmentor's (or encoder's) keys -> ours under ``prefix``; returns (converted, unused keys)."""
    out, unused = {}, []
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if backbone:
        timm_model = network.backbone.model if hasattr(network, "backbone") else network.model
        base = prefix + ("backbone.model." if hasattr(network, "backbone") else "model.")
        out.update({base + k: v for k, v in convert_state_dict(backbone, timm_model).items()})
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        has_head = hasattr(network, "head")  # an encoder (the feature distance's) keeps only the backbone
        ours = convert_head_key(key[len("decode_head.") :]) if has_head and key.startswith("decode_head.") else ""
        if ours:
            out[prefix + ours] = value
        else:
            unused.append(key)
    return out, unused


def convert_mmseg_checkpoint(checkpoint: dict, model: nn.Module) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """A DAFormer/HRDA/MIC checkpoint (or a plain mmseg segmentor's) -> (a state dict for ``model``, the source keys
    that have no place in it). ``model`` is this project's meta-architecture built from the matching config; every
    converted tensor is checked against (and, for the DAFormer head's Linear embeddings, reshaped to) the shape of
    the parameter it fills; a mismatch fails naming both keys."""
    state = _unwrap(checkpoint)
    groups: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for source, target in _PREFIXES:
            if key.startswith(source):
                groups.setdefault((source, target), {})[key[len(source) :]] = value
                break
        else:
            groups.setdefault(("", "student."), {})[key] = value  # a plain segmentor checkpoint
    own = model.state_dict()
    converted, unused = {}, []
    for (source, target), group in groups.items():
        if target == "feature_distance.encoder.":
            feature_distance = getattr(model, "feature_distance", None)
            network = feature_distance.encoder if feature_distance is not None else None
        else:
            network = getattr(model, target.rstrip("."), None)
        if network is None:  # e.g. a teacher or an ImageNet encoder this method does not have
            unused += [source + k for k in group]
            continue
        part, rest = _convert_segmentor(group, network, target)
        converted.update(part)
        unused += [source + k for k in rest]
    out = {}
    for key, value in converted.items():
        if key not in own:
            unused.append(key)
            continue
        if value.shape != own[key].shape:
            if value.dim() == 2 and own[key].dim() == 4 and own[key].shape[2:] == (1, 1):
                value = value.reshape(own[key].shape)  # an MLP (Linear) embedding as a 1x1 conv
            else:
                raise ValueError(
                    f"'{key}' has shape {tuple(own[key].shape)} here but {tuple(value.shape)} in the checkpoint: "
                    "does the config match the checkpoint's network?"
                )
        out[key] = value
    return out, unused
