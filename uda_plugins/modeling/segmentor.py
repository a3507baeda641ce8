"""The segmentation network a method trains: pixel normalisation, a backbone and a decode head.

``Segmentor`` is what a meta-architecture holds as ``student`` (and deep-copies as ``teacher``). Its
``forward`` maps normalised images to logits at the head's stride; :mod:`uda_plugins.modeling.inference` turns
it into full-resolution predictions.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from uda_plugins.d2 import BACKBONE_REGISTRY, SEM_SEG_HEADS_REGISTRY, CfgNode, ShapeSpec

__all__ = ["Segmentor", "stack_images"]


def stack_images(dicts: Sequence[dict], device: torch.device, key: str = "image") -> torch.Tensor:
    """The ``key`` tensors of a list of mapped dicts as one (N, C, H, W) float tensor on ``device``."""
    images = [d[key] for d in dicts]
    sizes = {tuple(i.shape) for i in images}
    if len(sizes) != 1:
        raise ValueError(f"A training batch needs images of one size (set INPUT.*.CROP_SIZE), got {sorted(sizes)}")
    return torch.stack(images).to(device, non_blocking=True).float()


class Segmentor(nn.Module):
    """Backbone (``MODEL.BACKBONE.NAME``) + decode head (``MODEL.SEM_SEG_HEAD.NAME``) + normalisation."""

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__()
        self.backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(
            cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
        )
        self.head = SEM_SEG_HEADS_REGISTRY.get(cfg.MODEL.SEM_SEG_HEAD.NAME)(cfg, self.backbone.output_shape())
        self.num_classes: int = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.ignore_value: int = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in 0..255 -> zero-mean unit-variance inputs."""
        return (images.to(self.pixel_mean.device).float() - self.pixel_mean) / self.pixel_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pixel_std + self.pixel_mean

    def extract_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.backbone(x)

    def decode(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> logits at the head's output stride."""
        return self.decode(self.extract_features(x))
