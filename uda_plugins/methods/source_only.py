"""Source-only training: supervised cross-entropy on the labelled source domain; the lower bound of every
adaptation table."""

from __future__ import annotations

from typing import Dict

import torch

from uda_plugins.d2 import META_ARCH_REGISTRY
from uda_plugins.data.build import DataRequirements
from uda_plugins.modeling import seg_cross_entropy

from .base import UDAMetaArch

__all__ = ["SourceOnly"]


@META_ARCH_REGISTRY.register()
class SourceOnly(UDAMetaArch):
    data_requirements = DataRequirements(source=True, source_labels=True, target=False)

    def forward_train(self, batch: Dict[str, list]) -> Dict[str, torch.Tensor]:
        images, labels = self.images_and_labels(batch["source"])
        logits = self.student(images)
        if self.should_visualize():
            self.visualize("source/input_gt_pred", images, labels, logits)
        return {"loss_source": seg_cross_entropy(logits, labels, ignore_index=self.ignore_value)}
