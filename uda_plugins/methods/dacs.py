"""DACS (Tranheden et al. 2021) as in the DAFormer/HRDA/MIC code base, with MIC's masked image consistency as a
switch.

Follows lhoyer/MIC ``seg/mmseg/models/uda/dacs.py`` (``DACS.forward_train``) and
``seg/mmseg/models/uda/masking_consistency_module.py``. One iteration:

1. source: ``L_src = CE(S(x_s), y_s)`` (+ ``L_FD`` on the same forward when ``UDA.FD.LAMBDA`` > 0);
2. pseudo-labels: the EMA teacher on the target images -> labels, confidence, the batch quality weight
   (threshold ``UDA.PSEUDO_LABEL.THRESHOLD``), with the crop-row or frame-margin rule;
3. ClassMix (``UDA.MIX.MODE class``): half of each source image's classes pasted onto target image i
   (source image i mod N_s); the mixed label takes the source label there and the pseudo-label elsewhere, the
   pixel weight 1 there and the pseudo-label weight elsewhere; then the strong augmentation on the mixed
   image: ``L_mix = CE_w(S(x_mix), y_mix, w_mix)``;
4. Guidance Training (``UDA.GUIDANCE.LAMBDA`` > 0, :mod:`uda_plugins.methods.guidance`): on the features of
   step 3's forward, the Guider reconstructs the target where the source was pasted, and the shared head predicts
   the unmixed target's pseudo-labels: ``L_guid``;
5. MIC (``UDA.MIC.LAMBDA`` > 0): the target images with a fresh strong augmentation and a block mask,
   ``L_MIC = lambda * CE_w(S(masked), pseudo-labels, weights)``.

The reference back-propagates each loss separately into the same gradients before one optimizer step; here
they are summed and back-propagated once (same gradients, one DDP all-reduce). The EMA update runs in a hook
after the optimizer step (:class:`~uda_plugins.hooks.EMATeacherHook`), which is the same sequence as the
reference's update at the start of the next iteration. With ``UDA.MIX.MODE none`` the student trains on the
strongly augmented target image itself (plain mean-teacher self-training).

The step is split into pieces a subclass may replace (QuadMix replaces the mixing and keeps a batch for the next
step): :meth:`DACS.source_and_pseudo_labels` (1, 2), :meth:`DACS.mix_losses` (3, 4), :meth:`DACS.mic_loss` (5) and
:meth:`DACS.end_step`; their random draws come in the order above.

Per-rank statistics: the quality weight is computed over this rank's target images (the reference is
single-GPU: over its batch).

Deviations from lhoyer/MIC ``seg/`` (docs/release-audit/foundations-dacs-daformer-hrda-mic.md; each paper config
runs as released, ``UDA.RELEASE_FIDELITY fixed`` turns every switch to our fix):

== ================================================================ ============================================
A1 ClassMix classes from the whole source batch, ignore label too    ``UDA.MIX.CLASSES_FROM_BATCH`` (switch)
A2 decode heads initialised as mmcv 1.3.7                             as released, the default (the release's
                                                                      design; ``heads/common.py``)
B1 HRDA's detail crop never at the last aligned offset                ``MODEL.HRDA.REFERENCE_CROP_OFFSETS`` (switch)
B2 the heads' norms decayed (mmcv's custom keys: head before norm)    ``SOLVER.HEAD_NORMS_DECAYED`` (switch)
B3 ClassMix's colour-jitter order drawn per image                     as released (one strong_transform per image)
B4 MIC's masked batch: one jitter order and blur sigma, blur always   ``UDA.MIC.STRONG_AUG_AS_RELEASED`` (switch)
C1 MIC's lambda on HRDA's fused term only                             ``UDA.MIC.LAMBDA_ON_FUSED_LOSS`` (switch)
C2 the unchecked 11th crop after 10 failed cat_max_ratio checks       as released (``data/transforms.py``)
C3 target images with RCS: uniform with replacement                   ours: a per-epoch permutation (uniform too)
C4 an RCS class no image reaches: the release asserts                 ours: dropped with a warning (a crash fixed)
C5 feature distance of a batch with no thing cell: NaN logged         ours: 0 (the same zero gradient)
C6 kornia 0.5.8's rgb_to_hsv eps 1e-6                                 as released
C7 HRDA's LR loss on (1 - att) LR; ``feature_scale='all'``            ``MODEL.HRDA.LR_LOSS_ON_ATTENDED_LOGITS``
                                                                      (switch); 'all' is not offered (no shipped
                                                                      config uses either: the LR weight is 0)
C8 MiT-B0..B4 (MLP ratio 4)                                           the backbones (see timm_backbone.py)
C9 provenance: exp 81 is MIC on DACS/DAFormer/HRDA                    the configs cite DAFormer exp 1/5, HRDA 41
C10 the teacher's first copy: parameters only                         ours: parameters and buffers (equal unless
                                                                      MODEL.WEIGHTS brings trained BN statistics)
C11 GTA5 frames whose label size differs: rescaled separately        ours: the label resized when prepared
C12 docs/methods.md's "per-scale decoder", "same augmentation"       the code is followed: one shared head,
                                                                      fresh draws for MIC
== ================================================================ ============================================
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from uda_plugins.d2 import META_ARCH_REGISTRY, CfgNode
from uda_plugins.data.build import DataRequirements
from uda_plugins.utils.profiling import timed

from .class_mix import class_mix_masks, mix
from .guidance import GuidanceTraining
from .masking import block_mask
from .self_training import SelfTrainingArch, SelfTrainingStep

__all__ = ["DACS"]


@META_ARCH_REGISTRY.register()
class DACS(SelfTrainingArch):
    data_requirements = DataRequirements(source=True, source_labels=True, target=True, target_labels=False)

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__(cfg)
        self.mix_mode = cfg.UDA.MIX.MODE
        if self.mix_mode not in ("class", "none"):
            raise ValueError(f"UDA.MIX.MODE must be 'class' or 'none', not '{self.mix_mode}'")
        self.classes_from_batch = cfg.UDA.MIX.CLASSES_FROM_BATCH
        mic = cfg.UDA.MIC
        self.mic_lambda, self.mic_block, self.mic_ratio = mic.LAMBDA, mic.BLOCK_SIZE, mic.RATIO
        self.mic_strong_aug_as_released = mic.STRONG_AUG_AS_RELEASED
        self.mic_lambda_on_fused_loss = mic.LAMBDA_ON_FUSED_LOSS
        self.guidance = None
        if cfg.UDA.GUIDANCE.LAMBDA > 0:
            if self.mix_mode != "class":
                raise ValueError("Guidance Training reconstructs what ClassMix pasted: it needs UDA.MIX.MODE class")
            self.guidance = GuidanceTraining(cfg, self.student)  # beside the student: the teacher gets none

    def forward_train(self, batch: Dict[str, list]) -> Dict[str, torch.Tensor]:
        step, losses = self.source_and_pseudo_labels(batch)
        mic_weight = self.mix_losses(step, losses)
        self.mic_loss(step, mic_weight, losses)
        self.end_step(step)
        return losses

    # ------------------------------------------------------------------------- the pieces of one step
    def source_and_pseudo_labels(self, batch: Dict[str, list]) -> Tuple[SelfTrainingStep, Dict[str, torch.Tensor]]:
        """Steps 1 and 2: the source losses and the teacher's pseudo-labels of the target batch."""
        if len(batch["target"]) != 1:
            raise ValueError(f"{type(self).__name__} adapts to one target domain; DATASETS.TARGET_TRAIN has several")
        src_images, src_labels = self.images_and_labels(batch["source"])
        tgt_dicts = batch["target"][0]
        tgt_images, _ = self.images_and_labels(tgt_dicts)
        visualize = self.should_visualize()

        losses, src_out = self.source_losses(src_images, src_labels)
        pseudo_labels, pseudo_weight, confidence, _ = self.pseudo_labels(tgt_images, tgt_dicts)
        step = SelfTrainingStep(
            batch, src_images, src_labels, tgt_images, pseudo_labels, pseudo_weight, confidence, visualize
        )
        if visualize:
            self.visualize("source/input_gt_pred", src_images, src_labels, src_out.logits)
            self.visualize_panel(
                "target/input_pseudolabel_confidence_weight", [tgt_images, pseudo_labels, confidence, pseudo_weight]
            )
        return step, losses

    def mix_losses(self, step: SelfTrainingStep, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Steps 3 and 4: ClassMix (``loss_mix``) and Guidance Training on its features (``loss_guidance``), added
        to ``losses``; returns the pixel weights of the MIC loss (Guidance Training changes them)."""
        src_images, src_labels, tgt_images = step.source_images, step.source_labels, step.target_images
        pseudo_labels, pseudo_weight = step.pseudo_labels, step.pseudo_weight
        n = tgt_images.shape[0]
        with timed("mix_mask_augment"):
            if self.mix_mode == "class":
                pair = torch.arange(n, device=src_images.device) % src_images.shape[0]
                masks = class_mix_masks(src_labels, self.ignore_value, self.classes_from_batch)[pair]
                mixed = mix(masks, src_images[pair], tgt_images)
                mixed_labels = mix(masks, src_labels[pair], pseudo_labels).long()
                mixed_weight = mix(masks, torch.ones_like(pseudo_weight), pseudo_weight)
            else:
                masks, mixed, mixed_labels, mixed_weight = None, tgt_images, pseudo_labels, pseudo_weight
            mixed = self.strong_aug(mixed, self.sample_strong_aug(n))
        with timed("student_forward"):
            mix_out = self.student.forward_train(mixed)
            losses["loss_mix"] = self.student.loss(mix_out, mixed_labels, mixed_weight)
        mic_weight = pseudo_weight
        if self.guidance is not None:
            with timed("student_forward"):  # the Guider and the shared head
                losses["loss_guidance"], mic_weight, guided_out = self.guidance(
                    self.student, mix_out, masks, pseudo_labels, pseudo_weight
                )
        if step.visualize:
            self.visualize_panel(
                "mix/input_mask_label_weight_pred", [mixed, masks, mixed_labels, mixed_weight, mix_out.logits]
            )
            if self.guidance is not None:
                self.visualize_panel(
                    "guidance/target_keptmask_pseudolabel_pred",
                    [tgt_images, 1 - masks, pseudo_labels, guided_out.logits],
                )
        return mic_weight

    def mic_loss(self, step: SelfTrainingStep, weight: torch.Tensor, losses: Dict[str, torch.Tensor]) -> None:
        """Step 5: MIC's masked image consistency (``loss_mic``) into ``losses``, when ``UDA.MIC.LAMBDA`` > 0."""
        if self.mic_lambda <= 0:
            return
        n = step.target_images.shape[0]
        with timed("mix_mask_augment"):
            # As released (masking_consistency_module.py L119-131): one strong_transform over the whole batch (one
            # jitter order and one blur sigma), its blur drawn whatever DACS's blur flag says. The fix: per image.
            released = self.mic_strong_aug_as_released
            params = self.sample_strong_aug(n, per_image=False, blur=True) if released else self.sample_strong_aug(n)
            masked = self.strong_aug(step.target_images, params)
            masked = masked * block_mask(n, *masked.shape[-2:], self.mic_block, self.mic_ratio, masked.device)
        with timed("student_forward"):
            masked_out = self.student.forward_train(masked)
            if self.mic_lambda_on_fused_loss:
                # As released (L142-143): lambda scales 'decode.loss_seg' only, HRDA's detail/context terms not.
                mic = self.student.loss(masked_out, step.pseudo_labels, weight, fused_weight=self.mic_lambda)
            else:
                mic = self.mic_lambda * self.student.loss(masked_out, step.pseudo_labels, weight)
            losses["loss_mic"] = mic
        if step.visualize:
            self.visualize_panel("mic/masked_pred", [masked, masked_out.logits])

    def end_step(self, step: SelfTrainingStep) -> None:
        """Called after every loss of the step: where a subclass keeps what the next step needs (QuadMix's
        previous-batch cache). DACS keeps nothing."""
