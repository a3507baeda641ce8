"""Detectron2's model registries, ``Backbone`` and ``ShapeSpec``, and ``build_model``."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from fvcore.common.registry import Registry
from torch import nn

__all__ = ["META_ARCH_REGISTRY", "BACKBONE_REGISTRY", "SEM_SEG_HEADS_REGISTRY", "Backbone", "ShapeSpec", "build_model"]

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = "Meta-architectures: called with a cfg, return an nn.Module."
BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = "Backbones: called as fn(cfg, input_shape), return a Backbone."
SEM_SEG_HEADS_REGISTRY = Registry("SEM_SEG_HEADS")
SEM_SEG_HEADS_REGISTRY.__doc__ = "Semantic segmentation heads: called as fn(cfg, input_shape: dict[str, ShapeSpec])."


@dataclass
class ShapeSpec:
    """Shape of a tensor; any field may be unknown (None)."""

    channels: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    stride: Optional[int] = None


class Backbone(nn.Module, metaclass=ABCMeta):
    """A network that maps an image batch to a dict of named feature maps."""

    def __init__(self) -> None:
        super().__init__()

    @abstractmethod
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        pass

    @property
    def size_divisibility(self) -> int:
        return 0

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def build_model(cfg) -> nn.Module:
    """``META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)`` moved to ``cfg.MODEL.DEVICE``; no weights."""
    model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    model.to(torch.device(cfg.MODEL.DEVICE))
    return model
