"""MCL — multi-level collaborative learning for multi-target adaptation (TCSVT 2024).

Follows feifei-cv/MCL@b91c947 ``models/adaptation_modelv2.py`` (``CustomModel.step_adv``, ``CustomModel.step``),
``train.py`` (``generate``) and ``data/randaugment.py``, with ``pretrain.sh`` and ``train.sh``. One shared backbone;
``UDA.MCL.STAGE`` picks one of the authors' two runs.

**Warm-up** (``step_adv``): one head per target domain (``MultiScaleSEHead``, the reference's
``Classifier_Module2``) and one output-level discriminator per target
(:class:`~uda_plugins.modeling.discriminator.OutputDiscriminator`) on ADVENT's self-information maps. With T
targets:

1. source: ``L_src = sum_i CE(head_i(x_s), y_s)`` (every head learns the source);
2. each target i: ``E_i`` = self-information of ``softmax(head_i(x_t^i))``;
   ``L_adv = ADV_WEIGHT * sum_i BCE(D_i(E_i), source)`` trains the segmenter to fool ``D_i``;
3. ``L_D = sum_i [BCE(D_i(E(head_i(x_s))), source) + BCE(D_i(E_i), target)]`` trains the discriminators.

The reference runs three backward passes and two optimizer steps (discriminators frozen for step 2, inputs
detached for step 3). Here the losses are summed and back-propagated once: the generator term goes through detached
discriminator weights and the discriminator term reads detached maps, which gives the same gradients
(``tests/test_discriminator.py``); the discriminators' Adam and the segmenter's SGD step together as one
:class:`~uda_plugins.engine.optim.CompositeOptimizer`, checkpointed with the model.

**Self-training** (``step``, the authors' "stage1", from the warm-up's weights): T target heads, a
domain-agnostic head (the deployed model, the only head with the ``HEAD_LR_MULTIPLIER``) and an ensemble head
reading T backbone features stacked. Soft pseudo-labels of every target image (head i on whole images of target
i) live in a :class:`~uda_plugins.data.pseudo_label_bank.PseudoLabelBank` per target, made when the stage starts
and remade every ``REFRESH_PERIOD`` iterations (:class:`~uda_plugins.hooks.PseudoLabelBankHook`). One iteration:

1. source, re-coloured to each target (L*a*b* mean/std transfer from the paired weak target image):
   ``sum_i CE(head_i(x_s->i), y_s) + CE(agnostic(x_s), y_s) + CE(ensemble([f(x_s->0), ..., f(x_s->T-1)]), y_s)``;
2. each target i: the pseudo-label crop at a quarter of the crop size, kept where its normalised entropy is below
   ``max(0.25, its class's batch median)``, warped like the strong view ``x^i`` (RandAugment + Cutout of the weak
   crop); ``o_i = head_i(x^i)``, ``o_ag = agnostic(x^i)``; for every other target j, ``x^i`` re-coloured to the
   strong view of target j gives ``o_j = head_j(x^i->j)``; ``W = mean_j exp(-GAMMA KL(p_i || p_j))`` (detached);
   ``L_ind = CE(o_i)``, ``L_col = sum_j CE(o_j) / (T-1)`` and ``L_ens = CE(ensemble(features of x^i in every
   style))``, each ``sum(CE * W * valid) / sum(valid)`` (or the release's broadcast, M1 below);
   ``L_kd = [KL(p_i || p_ag) + KL(p_ens || p_i)] / T`` with the teachers detached;
   ``L_i = L_kd + L_ind + 1.0 L_col + 0.05 L_ens``.

Decisions where the reference is ambiguous (docs/methods.md §3.11):

* ensemble channel order: slot k always holds the image in target k's style (``ENSEMBLE_ORDER domain``, the
  library's default); the reference's target side puts the own style first, swapping slots against its source side
  (``own_first``, which the paper configs set);
* evaluation: the agnostic head for every target in self-training (as the reference), the last target head in
  warm-up (the reference validates with head T-1); ``EVAL_HEAD`` names another;
* distillation is averaged over all elements of the probability maps, classes included (the reference's
  ``(loss_kd * mask).sum() / mask.sum()`` with an always-true mask), i.e. the per-pixel KL divided by C;
  ``DISTILLATION_WEIGHT`` scales it.

Each test set is reported with the mean over them; MCL's configs score at the input size as the release
(``TEST.EVAL_RESOLUTION input``) with ``mIoU_full_resolution`` beside it.

Differences from the release (docs/release-audit/duda-mcl.md §2; the switch that reproduces it, or why none;
``UDA.RELEASE_FIDELITY`` moves the listed switches together):

====  ==========================================================================  =================================
item  difference                                                                   as released
====  ==========================================================================  =================================
M1    none: the target CE terms' (B,1,h,w) mask times the (B,h,w) loss broadcast   ``TARGET_LOSS_REDUCTION
      to (B,B,h,w), per process (the release: one GPU, batch 4)                    batch_broadcast``
M2    none: RGB / 255, no mean or standard deviation                               ``MODEL.PIXEL_MEAN 0``,
                                                                                   ``PIXEL_STD 255``
M3    none: every image stretched to 640x320 (1024x512), RandomSized, 320x160      ``INPUT.*.RESIZE_MODE exact``,
      (512x256) crops; PIL BILINEAR twice, labels PIL NEAREST                      ``RESAMPLE_TWICE``,
                                                                                   ``INTERPOLATION pil_bilinear``
M4    none: scored at the input size against PIL-nearest labels                    ``TEST.EVAL_RESOLUTION input``
M5    none: the DeepLab-V2 "caffe" ResNet-101 (41x81 features for 320x640)         ``MODEL.TIMM.STYLE caffe``
M6    the strong view's label gets the image's exact warp; the release's replay    no switch (a fix)
      moves TranslateX labels twice as far and re-orders operations
M7    none: the ensemble's target-side slots own style first                       ``ENSEMBLE_ORDER own_first``
M8    soft labels keyed by path, not basename (74 IDD basenames repeat)            no switch (a fix)
M9    self-training starts from the warm-up's final model, not its best on val     ``MODEL.WEIGHTS`` names any
      (no target labels are used to choose it)                                     checkpoint
M10   colour transfer: none (OpenCV 8-bit, truncating casts). Still differ:        ``COLOR_TRANSFER opencv_uint8``
      logits resized with align_corners=False (the release: True) and soft
      labels stored as float16 (the release: float32)
M11   none: the head's initialisation as released (N(0, 0.01) weights, branch     —
      biases torch's default, the bottleneck's 0)
M12   Cutout covers its box, not one more row and column                           no switch
M13   documentation corrected (rand_augment.py)                                    —
M14   the methods notes' masked mean, input scaling and basenames: this table     —
====  ==========================================================================  =================================

Other choices: one Adam over all discriminators (the reference: one each; Adam is per-parameter, so the updates are
the same); the discriminators share the segmenter's learning-rate schedule; colour transfer (float) and RandAugment
run on the device (:mod:`~uda_plugins.data.color_transfer`, :mod:`~uda_plugins.data.rand_augment`); one forward
and one backward per iteration (the reference: one backward per target, the same gradients).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uda_plugins.d2 import META_ARCH_REGISTRY, CfgNode, comm
from uda_plugins.data.build import DataRequirements, build_full_view_loader, get_dataset_dicts
from uda_plugins.data.color_transfer import lab_color_transfer, opencv_color_transfer
from uda_plugins.data.pseudo_label_bank import PseudoLabelBank, SoftLabels, commit_in_batches
from uda_plugins.data.rand_augment import apply_rand_augment, sample_rand_augment, warp_label
from uda_plugins.modeling import size_groups, stack_images
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
from .offline_pseudo_labels import median_entropy_pseudo_labels

__all__ = ["MCL", "target_head_names", "AGNOSTIC", "ENSEMBLE", "target_self_training_losses"]

logger = logging.getLogger(__name__)

STAGES = ("warm_up", "self_training")
TARGET_LOSS_REDUCTIONS = ("masked_mean", "batch_broadcast")
COLOR_TRANSFERS = ("float", "opencv_uint8")
AGNOSTIC, ENSEMBLE = "agnostic", "ensemble"


def target_head_names(num_targets: int) -> List[str]:
    return [f"target{i}" for i in range(num_targets)]


def _mean_ce(logits: torch.Tensor, labels: torch.Tensor, ignore: int) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels (the reference's ``cross_entropy2d``), 0 when none is."""
    logits = upsample_like(logits, labels.shape[-2:]).float()
    valid = labels != ignore
    loss = F.cross_entropy(logits, labels, ignore_index=ignore, reduction="none")
    return loss.sum() / valid.sum().clamp(min=1)


def target_self_training_losses(
    own: torch.Tensor,
    agnostic: torch.Tensor,
    others: Sequence[torch.Tensor],
    ensemble: torch.Tensor,
    labels: torch.Tensor,
    gamma: float,
    rectify: bool,
    ignore: int,
    reduction: str = "masked_mean",
) -> Dict[str, torch.Tensor]:
    """MCL's losses of one target (``CustomModel.step``, the loop body over targets) from logits at the
    pseudo-label's resolution: ``own`` = its head on the strong view, ``agnostic`` = the agnostic head on it,
    ``others`` = each other target's head on the view re-coloured to that target, ``ensemble`` = the ensemble
    head, ``labels`` the selected, warped pseudo-labels. Unweighted terms: individual, collaborative, ensemble,
    distillation. ``reduction`` (``UDA.MCL.TARGET_LOSS_REDUCTION``): "masked_mean", or "batch_broadcast" as
    released, where every image's loss is weighted by every image's mask: sum_{y,x} [sum_b L W] [sum_b M] / sum M."""
    if reduction not in TARGET_LOSS_REDUCTIONS:
        raise ValueError(f"UDA.MCL.TARGET_LOSS_REDUCTION must be one of {TARGET_LOSS_REDUCTIONS}, not '{reduction}'")
    valid = (labels != ignore).float()
    safe = torch.where(labels != ignore, labels, 0)
    own_p = torch.softmax(own.float(), dim=1).detach()
    weight = torch.ones_like(valid)
    if rectify:
        agreement = [
            torch.exp(-gamma * F.kl_div(F.log_softmax(o.float(), 1), own_p, reduction="none").sum(1)) for o in others
        ]
        weight = (sum(agreement) / len(others)).detach()

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), safe, reduction="none")

    def weighted_mean(loss: torch.Tensor) -> torch.Tensor:
        loss = loss * valid  # the release's CE with ignore_index: 0 where the label is ignored
        if reduction == "batch_broadcast":  # (B, h, w) x (B, 1, h, w) -> (B, B, h, w), as adaptation_modelv2.py:296
            return (loss * weight * valid[:, None]).sum() / valid.sum().clamp(min=1)
        return (loss * weight).sum() / valid.sum().clamp(min=1)

    collaborative = weighted_mean(sum(ce(o) for o in others)) / len(others)
    # Two-level distillation: the agnostic head learns from head i, head i from the ensemble head.
    distillation = (
        F.kl_div(F.log_softmax(agnostic.float(), 1), own_p, reduction="none")
        + F.kl_div(F.log_softmax(own.float(), 1), torch.softmax(ensemble.float(), 1).detach(), reduction="none")
    ).mean()
    return {
        "individual": weighted_mean(ce(own)),
        "collaborative": collaborative,
        "ensemble": weighted_mean(ce(ensemble)),
        "distillation": distillation,
    }


@META_ARCH_REGISTRY.register()
class MCL(UDAMetaArch):
    data_requirements = DataRequirements(source=True, source_labels=True, target=True, target_labels=False)

    def __init__(self, cfg: CfgNode) -> None:
        m = cfg.UDA.MCL
        if m.STAGE not in STAGES:
            raise ValueError(f"UDA.MCL.STAGE must be one of {STAGES}, not '{m.STAGE}'")
        if len(cfg.DATASETS.TARGET_TRAIN) < 2:
            raise ValueError("MCL adapts to several targets: DATASETS.TARGET_TRAIN must name at least two datasets")
        if cfg.MODEL.HRDA.ENABLED or cfg.UDA.FD.LAMBDA > 0:
            raise ValueError("MCL uses neither HRDA nor the feature distance (MODEL.HRDA.ENABLED, UDA.FD.LAMBDA)")
        if m.ENSEMBLE_ORDER not in ("domain", "own_first"):
            raise ValueError(f"UDA.MCL.ENSEMBLE_ORDER must be 'domain' or 'own_first', not '{m.ENSEMBLE_ORDER}'")
        if m.TARGET_LOSS_REDUCTION not in TARGET_LOSS_REDUCTIONS:
            choices = TARGET_LOSS_REDUCTIONS
            raise ValueError(f"UDA.MCL.TARGET_LOSS_REDUCTION must be one of {choices}, not '{m.TARGET_LOSS_REDUCTION}'")
        if m.COLOR_TRANSFER not in COLOR_TRANSFERS:
            raise ValueError(f"UDA.MCL.COLOR_TRANSFER must be one of {COLOR_TRANSFERS}, not '{m.COLOR_TRANSFER}'")
        self.stage = m.STAGE
        self.num_targets = len(cfg.DATASETS.TARGET_TRAIN)
        super().__init__(cfg)
        names = target_head_names(self.num_targets)
        self.freeze_bn = m.FREEZE_BN
        if self.freeze_bn:
            for module in self.student.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    for p in module.parameters():
                        p.requires_grad_(False)
        default_head = names[-1] if self.stage == "warm_up" else AGNOSTIC
        eval_head = m.EVAL_HEAD or default_head
        if eval_head not in self.student.heads or eval_head == ENSEMBLE:
            choices = [n for n in self.student.heads if n != ENSEMBLE]
            raise ValueError(f"UDA.MCL.EVAL_HEAD '{eval_head}' is not one of this stage's heads {choices}")
        self.student.active_head = eval_head
        if self.stage == "warm_up":
            self.discriminators = nn.ModuleList(
                OutputDiscriminator(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, m.DISCRIMINATOR_WIDTH) for _ in names
            )
            self.adv_weight = m.ADV_WEIGHT
            self.discriminator_optimizer = (m.DISCRIMINATOR_LR, tuple(m.DISCRIMINATOR_BETAS))
            return
        self.target_names = list(cfg.DATASETS.TARGET_TRAIN)
        keep = cfg.SOLVER.MAX_CHECKPOINTS_TO_KEEP
        self._bank_root, self._bank_keep = (
            os.path.join(cfg.OUTPUT_DIR, "pseudo_label_bank"),
            keep + 1 if keep > 0 else 1 << 30,
        )
        self._banks: List[PseudoLabelBank] = []
        self.refresh_period, self.max_iter = m.REFRESH_PERIOD, cfg.SOLVER.MAX_ITER
        self.label_scale, self.entropy_floor = m.PSEUDO_LABEL_SCALE, m.ENTROPY_FLOOR
        self.rand_augment = (m.RAND_AUGMENT_N, m.RAND_AUGMENT_M)
        self.weights = {
            "individual": 1.0,
            "collaborative": m.COLLABORATIVE_WEIGHT,
            "ensemble": m.ENSEMBLE_WEIGHT,
            "distillation": m.DISTILLATION_WEIGHT,
        }
        self.rectify, self.gamma = m.RECTIFY, m.GAMMA
        self.own_style_first = m.ENSEMBLE_ORDER == "own_first"
        self.target_loss_reduction, self.color_transfer = m.TARGET_LOSS_REDUCTION, m.COLOR_TRANSFER

    # ------------------------------------------------------------------------------------------ building
    def build_student(self, cfg: CfgNode) -> MultiHeadSegmentor:
        names = target_head_names(self.num_targets)
        if self.stage == "warm_up":
            return MultiHeadSegmentor(cfg, names)
        return MultiHeadSegmentor(cfg, names + [AGNOSTIC, ENSEMBLE], stacked_inputs={ENSEMBLE: self.num_targets})

    def is_head_parameter(self, name: str) -> bool:
        """Which parameters get ``SOLVER.HEAD_LR_MULTIPLIER``: every head in warm-up, only the new domain-agnostic
        head in self-training (the reference's ``get_*_lr_params_new``)."""
        if self.stage == "warm_up":
            return "head" in name
        return name.startswith(f"student.heads.{AGNOSTIC}.")

    def separate_optimizers(self, cfg: CfgNode) -> List[torch.optim.Optimizer]:
        if self.stage != "warm_up":
            return []
        lr, betas = self.discriminator_optimizer
        return [torch.optim.Adam(self.discriminators.parameters(), lr=lr, betas=betas)]

    def training_hooks(self, cfg: CfgNode) -> List:
        if self.stage == "warm_up":
            return []
        from uda_plugins.hooks import PseudoLabelBankHook

        return [PseudoLabelBankHook(self, cfg)]

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
        if self.stage == "warm_up":
            return self._warm_up_step(batch)
        return self._self_training_step(batch)

    # ------------------------------------------------------------------------------------------- warm-up
    def _warm_up_step(self, batch: Dict[str, list]) -> Dict[str, torch.Tensor]:
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

    # ------------------------------------------------------------------------------- pseudo-label banks
    def pseudo_label_banks(self) -> List[PseudoLabelBank]:
        """Self-training: one bank of soft pseudo-labels per target (built on first use); warm-up: none."""
        if self.stage == "warm_up":
            return []
        if not self._banks:
            for name in self.target_names:
                files = [d["file_name"] for d in get_dataset_dicts([name])]
                root = os.path.join(self._bank_root, name)
                self._banks.append(PseudoLabelBank(root, files, keep_pinned=self._bank_keep, codec=SoftLabels))
        return self._banks

    def self_training_iteration(self, iteration: int) -> int:
        return iteration  # the whole run self-trains

    def _soft_labels(self, cfg: CfgNode, target: int):
        """(dataset index, float16 probabilities at the head's resolution) of every image of this process's shard
        of target ``target``, predicted by its own head on the whole image (the reference's ``generate``)."""
        per_rank = max(1, cfg.SOLVER.IMS_PER_BATCH_TARGET // comm.get_world_size())
        loader = build_full_view_loader(cfg, self.target_names[target], per_rank)
        name = target_head_names(self.num_targets)[target]

        def batches():
            was_training = self.training
            self.eval()
            try:
                with torch.no_grad():
                    for batch in loader:
                        pairs = []
                        for dicts in size_groups(batch):
                            images = self.student.normalize(stack_images(dicts, self.device))
                            logits = self.student.decode_with(name, self.student.extract_features(images))
                            probs = torch.softmax(logits.float(), dim=1).to(torch.float16).cpu().numpy()
                            pairs += [(d["dataset_index"], p) for d, p in zip(dicts, probs)]
                        yield pairs
            finally:
                self.train(was_training)  # MCL.train: BatchNorm stays frozen with FREEZE_BN

        return loader, batches()

    def initialize_bank(self, cfg: CfgNode) -> None:
        """Version 0 of every target's soft pseudo-labels, from the model as loaded (the warm-up's heads)."""
        with timed("pseudo_label_refresh"):
            for target, bank in enumerate(self.pseudo_label_banks()):
                logger.info("MCL: soft pseudo-labels of %s (%d images)", self.target_names[target], len(bank))
                _, batches = self._soft_labels(cfg, target)
                bank.initialize(pair for batch in batches for pair in batch)

    def commit_bank_update(self, cfg: CfgNode, iteration: int) -> None:
        """After the step of ``iteration``: remake the soft pseudo-labels when the next iteration is a refresh one
        (the reference regenerates before iteration ``it`` when ``(it + 1) % 10000 == 0``, except the last)."""
        upcoming = iteration + 1
        if self.refresh_period <= 0 or (upcoming + 1) % self.refresh_period or upcoming >= self.max_iter - 1:
            return
        with timed("pseudo_label_refresh"):
            for target, bank in enumerate(self.pseudo_label_banks()):
                logger.info("MCL: refreshing the soft pseudo-labels of %s after iteration %d", bank.root, iteration)
                loader, batches = self._soft_labels(cfg, target)
                commit_in_batches(bank, batches, loader.batch_size, iteration)

    # ------------------------------------------------------------------------------------ self-training
    def _styled(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """``content`` (RGB 0..255) re-coloured to ``style``, pairing image k with style image k mod len(style)."""
        with timed("color_transfer"):
            index = torch.arange(content.shape[0], device=style.device) % style.shape[0]
            if self.color_transfer == "opencv_uint8":
                return opencv_color_transfer(content, style[index])
            return lab_color_transfer(content, style[index])

    def _ensemble_slots(self, own: int, features: Dict[int, dict]) -> List[dict]:
        """Features by target style, in the ensemble head's channel order (see ``ENSEMBLE_ORDER``)."""
        order = list(range(self.num_targets))
        if self.own_style_first:
            order = [own] + [j for j in order if j != own]
        return [features[j] for j in order]

    def _pseudo_labels(self, target: int, dicts: List[dict], draws, crop_size: Tuple[int, int]) -> torch.Tensor:
        """The selected soft pseudo-labels of target ``target``'s crops at ``PSEUDO_LABEL_SCALE`` of the crop size,
        warped like the strong views."""
        crops = self.pseudo_label_banks()[target].crops_of(dicts)
        soft = torch.stack([torch.from_numpy(np.asarray(c)) for c in crops]).to(self.device).float()
        size = (int(crop_size[0] * self.label_scale), int(crop_size[1] * self.label_scale))
        soft = F.interpolate(soft, size=size, mode="bilinear", align_corners=False)
        labels, _ = median_entropy_pseudo_labels(soft, self.entropy_floor, self.ignore_value)
        return torch.stack([warp_label(label, draw, self.ignore_value) for label, draw in zip(labels, draws)])

    def _self_training_step(self, batch: Dict[str, list]) -> Dict[str, torch.Tensor]:
        T, names = self.num_targets, target_head_names(self.num_targets)
        student, norm, ignore = self.student, self.student.normalize, self.ignore_value
        source_raw = stack_images(batch["source"], self.device)
        source_labels = torch.stack([d["sem_seg"] for d in batch["source"]]).to(self.device)
        weak = [stack_images(dicts, self.device) for dicts in batch["target"]]

        # Source: individual (each target's style), agnostic (as is) and ensemble (all styles) supervision.
        styled_sources = [self._styled(source_raw, weak[i]) for i in range(T)]
        with timed("student_forward"):
            styled_features = [student.extract_features(norm(x)) for x in styled_sources]
            loss_source = sum(
                _mean_ce(student.decode_with(names[i], f), source_labels, ignore) for i, f in enumerate(styled_features)
            )
            agnostic_logits = student.decode_with(AGNOSTIC, student.extract_features(norm(source_raw)))
            loss_source = loss_source + _mean_ce(agnostic_logits, source_labels, ignore)
            loss_source_ensemble = _mean_ce(student.decode_stacked(ENSEMBLE, styled_features), source_labels, ignore)

        # Strong views of every target, drawn before any is used (another target's view is a style reference).
        crop_size = tuple(weak[0].shape[-2:])
        with timed("rand_augment"):
            n, m = self.rand_augment
            draws = [[sample_rand_augment(crop_size, n, m) for _ in range(len(w))] for w in weak]
            strong = [
                torch.stack([apply_rand_augment(x, d) for x, d in zip(w, ds)]).float() for w, ds in zip(weak, draws)
            ]

        totals = {k: 0.0 for k in self.weights}
        for i in range(T):
            with timed("pseudo_labels"):
                labels = self._pseudo_labels(i, batch["target"][i], draws[i], crop_size)
            size = labels.shape[-2:]
            styled = {j: self._styled(strong[i], strong[j]) for j in range(T) if j != i}
            with timed("student_forward"):  # the forwards with their losses
                features = {i: student.extract_features(norm(strong[i]))}
                own = upsample_like(student.decode_with(names[i], features[i]), size)
                agnostic = upsample_like(student.decode_with(AGNOSTIC, features[i]), size)
                others = []
                for j in styled:
                    features[j] = student.extract_features(norm(styled[j]))
                    others.append(upsample_like(student.decode_with(names[j], features[j]), size))
                ensemble = upsample_like(student.decode_stacked(ENSEMBLE, self._ensemble_slots(i, features)), size)
                terms = target_self_training_losses(
                    own,
                    agnostic,
                    others,
                    ensemble,
                    labels,
                    self.gamma,
                    self.rectify,
                    ignore,
                    self.target_loss_reduction,
                )
            for k, v in terms.items():
                totals[k] = totals[k] + v
            if i == 0 and self.should_visualize():
                self.visualize("source/input_gt_pred", norm(source_raw), source_labels, agnostic_logits)
                self.visualize_panel(
                    "target0/strong_pseudo_label_own_agnostic", [norm(strong[i]), labels, own, agnostic]
                )
        losses = {"loss_source": loss_source, "loss_source_ensemble": loss_source_ensemble}
        losses.update({f"loss_{k}": self.weights[k] * totals[k] for k in self.weights})
        losses["loss_distillation"] = losses["loss_distillation"] / T
        return losses
