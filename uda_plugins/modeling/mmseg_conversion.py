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

Guidance Training checkpoints (Wenlve-Zhou/Guidance-Training) add the student's Guider, which lands in
``guidance.guider.*`` (:mod:`uda_plugins.methods.guidance`; the teacher's unused copy, ``ema_model.guider.*``, has
no place here):

==========================================================  ===================================================
released code (``seg/mmseg/models/Guider.py``), ``guider.``  here, ``guidance.guider.``
==========================================================  ===================================================
``attn.mask_token`` / ``projector.mask_token``               ``aggregation_token`` / ``projector_token``
``attn.patch_embed.proj.*`` (timm PatchEmbed)                ``patch_embed.*``
``attn.blocks.<i>.*`` (timm Block)                           ``blocks.<i>.*``
``attn.z1.*`` / ``projector.z2.*``                           ``z1.*`` / ``z2.*``
``projector.decoder_norm.*`` / ``projector.decoder_pred.*``  ``decoder_norm.*`` / ``decoder_pred.*``
``attn.pos_embed`` (fixed sin-cos, ``requires_grad=False``)  none: computed for the grid at hand (the same values)
==========================================================  ===================================================

The logged run's ``completor.attn.*`` (its module print, log:667-712, names ``patch_embed.proj``, ``blocks``,
``decoder_norm``, ``decoder_pred``, ``conv1``, ``conv2``) maps the same way, ``conv1`` / ``conv2`` to ``z1`` / ``z2``
by their numbers (HEAD's input conv is ``z1``, its output conv ``z2``); both are 1x1 C->C convs, so their shapes
cannot confirm it. The Completor's own parameters (mask tokens, position embedding) are not in the print and their names
are unknown, so they are reported among the unused keys and the tokens keep this model's values.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch
from torch import nn

from .backbones.timm_backbone import _unwrap, convert_state_dict

__all__ = ["convert_mmseg_checkpoint", "convert_head_key", "convert_guider_key"]

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


# The transformer's layers (patterns after "attn." / "projector."), named alike in the Guider and the Completor.
_AGGREGATION_LAYERS = [
    (r"(blocks\.\d+\..+)$", lambda m: m[1]),
    (r"patch_embed\.proj\.(weight|bias)$", lambda m: f"patch_embed.{m[1]}"),
]
_PROJECTOR_LAYERS = [(r"(decoder_norm|decoder_pred)\.(weight|bias)$", lambda m: f"{m[1]}.{m[2]}")]
_GUIDER_RULES = {
    "guider.": [  # the released code: Guider.attn (Aggregation) and Guider.projector (Projector)
        (r"attn\.mask_token$", lambda m: "aggregation_token"),
        (r"projector\.mask_token$", lambda m: "projector_token"),
        (r"attn\.z1\.(weight|bias)$", lambda m: f"z1.{m[1]}"),
        (r"projector\.z2\.(weight|bias)$", lambda m: f"z2.{m[1]}"),
    ]
    + [(r"attn\." + p, r) for p, r in _AGGREGATION_LAYERS]
    + [(r"projector\." + p, r) for p, r in _PROJECTOR_LAYERS],
    "completor.": [  # the logged run: one Completor.attn holding every printed layer (log:667-712)
        (r"attn\.conv1\.(weight|bias)$", lambda m: f"z1.{m[1]}"),
        (r"attn\.conv2\.(weight|bias)$", lambda m: f"z2.{m[1]}"),
    ]
    + [(r"attn\." + p, r) for p, r in _AGGREGATION_LAYERS + _PROJECTOR_LAYERS],
}


def convert_guider_key(key: str) -> str:
    """A Guidance Training segmentor key (``guider.*`` of the released code or ``completor.*`` of the logged run,
    without the ``model.`` prefix) -> this project's key under the meta-architecture (``guidance.guider.*``), or ""
    for keys with no counterpart (the fixed position embedding, the Completor's unprinted parameters)."""
    for prefix, rules in _GUIDER_RULES.items():
        if key.startswith(prefix):
            for pattern, rename in rules:
                m = re.match(pattern, key[len(prefix) :])
                if m:
                    return "guidance.guider." + rename(m)
    return ""


def _split_guider(group: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(the segmentor's own keys, its Guider's) of one ``model.``-like group."""
    guider = {k: v for k, v in group.items() if k.startswith(tuple(_GUIDER_RULES))}
    return {k: v for k, v in group.items() if k not in guider}, guider


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
        group, guider = _split_guider(group)
        for key, value in guider.items():  # only the student's Guider is ours; the teacher has none
            ours = convert_guider_key(key) if target == "student." and getattr(model, "guidance", None) else ""
            if ours:
                converted[ours] = value
            else:
                unused.append(source + key)
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
