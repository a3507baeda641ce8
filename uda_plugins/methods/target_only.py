"""Target-only ("oracle") training: supervised cross-entropy on the labelled target training set. It is the upper
bound adaptation is measured against; it reads target labels, which no adaptation method may do."""

from __future__ import annotations

from typing import Dict

import torch

from uda_plugins.d2 import META_ARCH_REGISTRY
from uda_plugins.data.build import DataRequirements
from uda_plugins.utils.profiling import timed

from .base import UDAMetaArch

__all__ = ["TargetOnly"]


@META_ARCH_REGISTRY.register()
class TargetOnly(UDAMetaArch):
    data_requirements = DataRequirements(source=False, source_labels=False, target=True, target_labels=True)

    def forward_train(self, batch: Dict[str, list]) -> Dict[str, torch.Tensor]:
        losses = {}
        for k, target_batch in enumerate(batch["target"]):
            images, labels = self.images_and_labels(target_batch)
            key = "loss_target" if len(batch["target"]) == 1 else f"loss_target{k}"
            with timed("student_forward"):
                out = self.student.forward_train(images)
                losses[key] = self.student.loss(out, labels)
            if k == 0 and self.should_visualize():
                self.visualize("target/input_gt_pred", images, labels, out.logits)
        return losses
