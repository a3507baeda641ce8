"""MCL — multi-level collaborative learning for multi-target adaptation (TCSVT 2024): the warm-up stage.

Follows feifei-cv/MCL@b91c947 ``models/adaptation_modelv2.py`` (``CustomModel.step_adv``) with ``pretrain.sh``:
a shared backbone with one head per target domain (``MultiScaleSEHead``, the reference's ``Classifier_Module2``) and
one output-level discriminator per target (:class:`~uda_plugins.modeling.discriminator.OutputDiscriminator`) on
ADVENT's self-information maps. One iteration, with T targets:

1. source: ``L_src = sum_i CE(head_i(x_s), y_s)`` (every head learns the source);
2. each target i: ``E_i`` = self-information of ``softmax(head_i(x_t^i))``;
   ``L_adv = ADV_WEIGHT * sum_i BCE(D_i(E_i), source)`` trains the segmenter to fool ``D_i``;
3. ``L_D = sum_i [BCE(D_i(E(head_i(x_s))), source) + BCE(D_i(E_i), target)]`` trains the discriminators.

The reference runs three backward passes and two optimizer steps (discriminators frozen for step 2, inputs
detached for step 3). Here the losses are summed and back-propagated once: the generator term goes through detached
discriminator weights and the discriminator term reads detached maps, which gives the same gradients
(``tests/test_discriminator.py``); the discriminators' Adam and the segmenter's SGD step together as one
:class:`~uda_plugins.engine.optim.CompositeOptimizer`, checkpointed with the model.

Deviations: logits are upsampled with align_corners=False (the reference: True); one Adam over all discriminators
(the reference: one each; Adam is per-parameter, so the updates are the same); the discriminators share the
segmenter's learning-rate schedule, warm-up included. Evaluation uses one head for every test set (``EVAL_HEAD``,
the last target's by default, as the reference validates its warm-up, docs/methods.md §3.11.3); each test set is
reported and their mean. The self-training stage (soft pseudo-labels, collaborative and ensemble heads,
distillation) is the next part of this plugin.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from uda_plugins.d2 import META_ARCH_REGISTRY, CfgNode
from uda_plugins.data.build import DataRequirements
from uda_plugins.modeling.discriminator import (
    OutputDiscriminator,
    discriminator_loss,
    generator_loss,
    self_information,
)
from uda_plugins.modeling.losses import upsample_like
from uda_plugins.modeling.multi_head import MultiHeadSegmentor
from uda_plugins.utils.profiling import timed

from .base import UDAMetaArch

__all__ = ["MCL", "target_head_names"]


def target_head_names(num_targets: int) -> List[str]:
    return [f"target{i}" for i in range(num_targets)]


def _mean_ce(logits: torch.Tensor, labels: torch.Tensor, ignore: int) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels (the reference's ``cross_entropy2d``), 0 when none is."""
    logits = upsample_like(logits, labels.shape[-2:]).float()
    valid = labels != ignore
    loss = F.cross_entropy(logits, labels, ignore_index=ignore, reduction="none")
    return loss.sum() / valid.sum().clamp(min=1)


@META_ARCH_REGISTRY.register()
class MCL(UDAMetaArch):
    data_requirements = DataRequirements(source=True, source_labels=True, target=True, target_labels=False)

    def __init__(self, cfg: CfgNode) -> None:
        m = cfg.UDA.MCL
        if m.STAGE != "warm_up":
            raise NotImplementedError(
                f"UDA.MCL.STAGE '{m.STAGE}': only the warm-up stage is implemented so far (issue 7 is open)"
            )
        if len(cfg.DATASETS.TARGET_TRAIN) < 2:
            raise ValueError("MCL adapts to several targets: DATASETS.TARGET_TRAIN must name at least two datasets")
        if cfg.MODEL.HRDA.ENABLED or cfg.UDA.FD.LAMBDA > 0:
            raise ValueError("MCL uses neither HRDA nor the feature distance (MODEL.HRDA.ENABLED, UDA.FD.LAMBDA)")
        self.num_targets = len(cfg.DATASETS.TARGET_TRAIN)
        super().__init__(cfg)
        names = target_head_names(self.num_targets)
        self.student.active_head = names[m.EVAL_HEAD]
        self.discriminators = nn.ModuleList(
            OutputDiscriminator(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, m.DISCRIMINATOR_WIDTH) for _ in names
        )
        self.adv_weight = m.ADV_WEIGHT
        self.discriminator_optimizer = (m.DISCRIMINATOR_LR, tuple(m.DISCRIMINATOR_BETAS))
        self.freeze_bn = m.FREEZE_BN
        if self.freeze_bn:
            for module in self.student.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    for p in module.parameters():
                        p.requires_grad_(False)

    def build_student(self, cfg: CfgNode) -> MultiHeadSegmentor:
        return MultiHeadSegmentor(cfg, target_head_names(self.num_targets))

    def separate_optimizers(self, cfg: CfgNode) -> List[torch.optim.Optimizer]:
        lr, betas = self.discriminator_optimizer
        return [torch.optim.Adam(self.discriminators.parameters(), lr=lr, betas=betas)]

    def train(self, mode: bool = True) -> "MCL":
        super().train(mode)
        if self.freeze_bn:
            for module in self.student.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward_train(self, batch: Dict[str, list]) -> Dict[str, torch.Tensor]:
        if len(batch["target"]) != self.num_targets:
            raise ValueError(f"MCL was built for {self.num_targets} targets, the batch has {len(batch['target'])}")
        names = target_head_names(self.num_targets)
        source_images, source_labels = self.images_and_labels(batch["source"])
        with timed("student_forward"):
            source_features = self.student.extract_features(source_images)
            source_logits = [self.student.decode_with(name, source_features) for name in names]
            loss_source = sum(_mean_ce(logits, source_labels, self.ignore_value) for logits in source_logits)
        loss_adv, loss_d = 0.0, 0.0
        target_views = []
        for i, (name, dicts) in enumerate(zip(names, batch["target"])):
            target_images, _ = self.images_and_labels(dicts)
            with timed("student_forward"):
                target_logits = self.student.decode_with(name, self.student.extract_features(target_images))
            size = target_images.shape[-2:]
            target_map = self_information(torch.softmax(upsample_like(target_logits, size).float(), dim=1))
            source_map = self_information(
                torch.softmax(upsample_like(source_logits[i], source_images.shape[-2:]).float(), dim=1)
            )
            with timed("discriminators"):
                loss_adv = loss_adv + generator_loss(self.discriminators[i], target_map)
                loss_d = loss_d + discriminator_loss(self.discriminators[i], source_map, target_map)
            target_views.append((target_images, target_logits))
        if self.should_visualize():
            self.visualize("source/input_gt_pred", source_images, source_labels, source_logits[-1])
            for i, (images, logits) in enumerate(target_views):
                entropy = self_information(torch.softmax(logits.float(), dim=1)).sum(1)
                self.visualize_panel(f"target{i}/input_pred_entropy", [images, logits, entropy])
        return {
            "loss_source": loss_source,
            "loss_adversarial": self.adv_weight * loss_adv,
            "loss_discriminator": loss_d,
        }
