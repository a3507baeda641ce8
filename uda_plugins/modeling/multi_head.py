"""One backbone with several decode heads, selected by name (MCL: one head per target domain, then a
domain-agnostic and an ensemble head)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from uda_plugins.d2 import SEM_SEG_HEADS_REGISTRY, CfgNode

from .segmentor import Segmentor

__all__ = ["MultiHeadSegmentor"]


class MultiHeadSegmentor(Segmentor):
    """A :class:`Segmentor` whose ``MODEL.SEM_SEG_HEAD`` exists once per name in ``head_names`` (independently
    initialised). ``decode``/``predict``/``forward`` use ``active_head`` (what evaluation sees); training code names
    the head it wants with :meth:`decode_with`.

    ``stacked_inputs`` names heads that read several images' deepest features concatenated along the channels
    (MCL's ensemble head: one per target style), with their number; such a head is fed by :meth:`decode_stacked`.
    """

    def __init__(self, cfg: CfgNode, head_names: Sequence[str], stacked_inputs: Optional[Dict[str, int]] = None):
        super().__init__(cfg)
        if len(set(head_names)) != len(head_names) or not head_names:
            raise ValueError(f"Head names must be distinct and at least one: {list(head_names)}")
        self.stacked_inputs = dict(stacked_inputs or {})
        self.deepest_feature = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES[-1]
        width = self.backbone.output_shape()[self.deepest_feature].channels
        build = SEM_SEG_HEADS_REGISTRY.get(cfg.MODEL.SEM_SEG_HEAD.NAME)
        heads = {}
        for k, name in enumerate(head_names):
            if k == 0 and name not in self.stacked_inputs:
                heads[name] = self._modules.pop("head")  # the one Segmentor built
            else:
                kwargs = {"in_channels": width * self.stacked_inputs[name]} if name in self.stacked_inputs else {}
                heads[name] = build(cfg, self.backbone.output_shape(), **kwargs)
        if "head" in self._modules:
            del self._modules["head"]
        self.heads = nn.ModuleDict(heads)
        self.active_head = head_names[-1]

    @property
    def head(self) -> nn.Module:
        return self.heads[self.active_head]

    def decode(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads[self.active_head](features)

    def networks(self) -> List[nn.Module]:
        return [self.backbone, *self.heads.values()]

    def decode_with(self, name: str, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads[name](features)

    def decode_stacked(self, name: str, features: Sequence[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """Head ``name`` on the deepest features of ``features`` (one dict per image style) stacked in that order."""
        if len(features) != self.stacked_inputs.get(name):
            raise ValueError(
                f"Head '{name}' reads {self.stacked_inputs.get(name)} stacked features, not {len(features)}"
            )
        key = self.deepest_feature
        return self.heads[name]({key: torch.cat([f[key] for f in features], dim=1)})
