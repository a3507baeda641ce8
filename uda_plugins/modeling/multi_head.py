"""One backbone with several decode heads, selected by name (MCL: one head per target domain, then a
domain-agnostic and an ensemble head)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from uda_plugins.d2 import SEM_SEG_HEADS_REGISTRY, CfgNode

from .segmentor import Segmentor

__all__ = ["MultiHeadSegmentor"]


class MultiHeadSegmentor(Segmentor):
    """A :class:`Segmentor` whose ``MODEL.SEM_SEG_HEAD`` exists once per name in ``head_names`` (independently
    initialised). ``decode``/``predict``/``forward`` use ``active_head`` (what evaluation sees); training code names
    the head it wants with :meth:`decode_with`."""

    def __init__(self, cfg: CfgNode, head_names: Sequence[str], head_in_channels: Optional[Dict[str, int]] = None):
        super().__init__(cfg)
        if len(set(head_names)) != len(head_names) or not head_names:
            raise ValueError(f"Head names must be distinct and at least one: {list(head_names)}")
        widths = head_in_channels or {}
        build = SEM_SEG_HEADS_REGISTRY.get(cfg.MODEL.SEM_SEG_HEAD.NAME)
        heads = {}
        for k, name in enumerate(head_names):
            if k == 0 and name not in widths:
                heads[name] = self._modules.pop("head")  # the one Segmentor built
            else:
                kwargs = {"in_channels": widths[name]} if name in widths else {}
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

    def decode_with(self, name: str, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads[name](features)
