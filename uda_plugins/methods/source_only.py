"""Source-only training: supervised cross-entropy on the labelled source domain (plus DAFormer's feature distance
when ``UDA.FD.LAMBDA`` > 0, and rare-class sampling when it is on); the lower bound of every adaptation table."""

from __future__ import annotations

from typing import Dict

import torch

from uda_plugins.d2 import META_ARCH_REGISTRY
from uda_plugins.data.build import DataRequirements

from .base import UDAMetaArch

__all__ = ["SourceOnly"]


@META_ARCH_REGISTRY.register()
class SourceOnly(UDAMetaArch):
    data_requirements = DataRequirements(source=True, source_labels=True, target=False)

    def forward_train(self, batch: Dict[str, list]) -> Dict[str, torch.Tensor]:
        images, labels = self.images_and_labels(batch["source"])
        losses, out = self.source_losses(images, labels)
        if self.should_visualize():
            self.visualize("source/input_gt_pred", images, labels, out.logits)
        return losses
