"""DUDA — online-offline dual pseudo-labels (BMVC 2022).

Follows parquets/DUDA ``trainers/uda_trainer.py`` (``self_train_step``, ``get_online_pseudo_label``,
``update_offline_pseudo``, ``mean_update_bn``) with ``configs/gtav2cityscapes/IAST/self_train_res101_update.yaml``.
One self-training iteration (``UDA.DUDA``):

1. source: ``L_src = CE(S(x_s), y_s)`` (+ the DAFormer feature distance when ``UDA.FD.LAMBDA`` > 0);
2. the student on the target crop ``x_t`` (random scale, crop, flip; no photometric augmentation): ``o``;
3. **offline** labels: the crop of the image's label in the pseudo-label bank, ``L_off = SCE(o, y_off)``
   (0.2 CE + 1.0 RCE);
4. the teacher (uniform running mean of the student's weights: ``UDA.TEACHER.ALPHA`` 1.0, its BatchNorm buffers
   copied from the student at every update as torch's ``AveragedModel``, ``TEACHER_BUFFERS``), as released
   (``TEACHER_FORWARDS as_released``): in train mode on the crops (discarded: its statistics move) and on the whole
   image, whose logits carried to the crop by the sample's recorded geometry are the consistency target ``z``,
   ``L_cons = MSE(softmax o, softmax z)``; then in eval mode on the whole image for steps 5 and 6;
5. **online** labels: argmax of the eval-mode prediction where the confidence is in the top ALPHA fraction of its
   class in the batch,
   ``L_on = 0.5 CE(o, y_on)``, plus IAST's entropy (pixels y_on ignores) and KL-to-uniform (the others) terms;
6. from ``UPDATE_START`` on, the bank's labels of the batch's images are rewritten after the step by **temporal
   consistency** (:func:`~uda_plugins.methods.offline_pseudo_labels.temporal_consistency_update`) from the teacher's
   eval-mode whole-image prediction of step 4, refilled pixels needing a top-BETA confidence of their class.

The student's BatchNorm as released (``BATCH_NORM frozen_affine``): the affine parameters are not trained (and not
in the optimizer), the layers normalise with batch statistics, source and target in separate forwards; with several
processes ``MODEL.BACKBONE.NORM SyncBN`` synchronises them as the release's SyncBN does. Dropout 0.5 on layer4
(``MODEL.SEM_SEG_HEAD.DROPOUT``) is active in the student and in the teacher's train-mode forwards.

Choices (docs/methods.md §5.7):

* Input as released (``dataset/augmentation.py:145-160``): BGR minus the Caffe means (the configs' ``INPUT.FORMAT
  BGR``), converted where the segmentor normalises, so evaluation and prediction feed the same order. The release's
  geometry: every image stretched to its dataset's size, sides ``int(scale * side)`` (the configs' ``RESIZE_MODE
  exact``, ``SIZE_ROUNDING floor``).

* The bank update runs in a hook after the optimizer step (:class:`~uda_plugins.hooks.PseudoLabelBankHook`), from
  predictions the forward kept: with gradient accumulation it runs once per step over all micro-batches (BETA
  thresholds over the rank's whole batch), its file I/O is outside the forward/backward, and it is placed before the
  checkpointer, so a checkpoint holds the bank after its iteration's writes. The reference writes inside the step;
  the labels a step reads are the same (the bank after the previous step).
* Resampling as released (``RESAMPLE_AS_RELEASED``): logits, not probabilities, are carried to the crop and then
  softmaxed, bilinear with align_corners=True for the teacher and the student alike; False is mmseg's convention.
* ``UPDATE_MODE periodic`` rewrites the whole bank every ``REFRESH_PERIOD`` iterations instead (the same rule, per
  batch of whole images).
* Thresholds are per rank and per (micro-)batch, as the reference's per-GPU numpy percentiles (§5.7.6), computed on
  the device.
* The offline regularisers the authors commented out are ``OFFLINE_REGULARIZERS`` (off by default, §5.7.2).
* The teacher's BatchNorm statistics are re-estimated on whole target training images before every evaluation
  (the reference: its training loader's crops).
* ``SOURCE_WARMUP_ITERS`` trains source-only first in the same run, then fills the bank from that model (IAST
  selection) and starts the mean teacher from it; the authors load a separately trained warm-up model and a
  downloaded bank instead (``MODEL.WEIGHTS`` and ``UDA.PSEUDO_LABEL_BANK.INITIAL_DIR``). Schedules count from the
  start of self-training.

Differences from the release (docs/release-audit/duda-mcl.md §1; the switch that reproduces the release, or why none):

====  ==========================================================================  =================================
item  difference                                                                   as released
====  ==========================================================================  =================================
D1    none: BatchNorm affine frozen (out of SGD), batch statistics                 ``BATCH_NORM frozen_affine``
D2    none: the mean teacher's train-mode forwards (crops, whole images) and its   ``TEACHER_FORWARDS as_released``,
      eval-mode forward; its buffers copied from the student (torch >= 1.13)       ``TEACHER_BUFFERS student``
D3    none: Dropout2d(0.5) on layer4 before the ASPP                               ``MODEL.SEM_SEG_HEAD.DROPOUT 0.5``
D4    none: BGR minus the Caffe means                                              ``INPUT.FORMAT BGR``
D5    none: the DeepLab-V2 "caffe" ResNet; the authors' checkpoints convert        ``MODEL.TIMM.STYLE caffe``,
      (tools/convert_duda_checkpoint.py). Their FDA warm-up is not released:       the converter
      the README's warm-up trains this network source-only instead
D6    none: every image stretched to its dataset's size, sides floored             ``INPUT.*.RESIZE_MODE exact``
D7    none: the source CE over the labelled pixels                                 ``LOSS_AVERAGE labelled_pixels``
D8    none: logits carried to the crop, then softmaxed; align_corners=True         ``RESAMPLE_AS_RELEASED True``
D9    none: PIL's Lanczos for images and NEAREST for labels, the stretch and the   ``INTERPOLATION lanczos``,
      scale one after the other (SYNTHIA: 1280x760 -> 1820x1024 -> the scale)     ``RESAMPLE_TWICE True``
D10   none (= D6)                                                                  ``RESIZE_MODE exact``
D11   the teacher's BatchNorm re-estimated on whole target images, averaged over   no switch
      processes, before each evaluation; the release uses its training loader's
      crops, per process, and also evaluates at iteration 600
D12   the initial bank from IAST's selection ported here (the release's generator  ``INITIAL_DIR`` reads their PNGs
      is not in its repository)
D13   the warm-up LR: multiplicative warm-up x poly (at most 2.25% apart, at       no switch
      iterations 1999-2000; equal from 2001)
D14   0 (not NaN) for a loss without any labelled pixel                            none (a fix)
D15   steps the GradScaler skips do not update the mean model, the bank or the     none (a fix)
      schedules (SOLVER.MAX_SKIPPED_NONFINITE_STEPS)
D16   documentation corrected                                                      —
====  ==========================================================================  =================================
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Iterator, List, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uda_plugins.d2 import META_ARCH_REGISTRY, CfgNode, comm, get_event_storage
from uda_plugins.data.build import DataRequirements, build_full_view_loader, get_dataset_dicts
from uda_plugins.data.pseudo_label_bank import PseudoLabelBank, commit_in_batches, read_initial_label
from uda_plugins.data.transforms import Geometry, apply_geometry_tensor
from uda_plugins.modeling import class_maximum, stack_images
from uda_plugins.modeling.inference import predict_full_views
from uda_plugins.modeling.losses import (
    entropy_regularizer,
    kld_uniform_regularizer,
    symmetric_cross_entropy,
    upsample_like,
)
from uda_plugins.utils.profiling import timed

from .offline_pseudo_labels import (
    InstanceAdaptiveSelector,
    class_percentile_thresholds,
    keep_top_fraction,
    ramp,
    temporal_consistency_update,
)
from .self_training import SelfTrainingArch
from .teacher import copy_parameters_

__all__ = ["DUDA", "recalibrate_batch_norm"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def recalibrate_batch_norm(network: nn.Module, loader, normalize) -> int:
    """Re-estimate the running statistics of ``network``'s BatchNorm layers as the plain average over the batches
    of ``loader`` (fvcore's precise BN, the authors' ``mean_update_bn``), averaged over processes. Returns the
    number of layers re-estimated (0: nothing to do)."""
    from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

    from .teacher import set_stochastic_layers_eval

    was_training = network.training
    network.train()  # fvcore re-estimates the BatchNorm layers that are in training mode
    set_stochastic_layers_eval(network)
    if not get_bn_modules(network):
        network.train(was_training)
        return 0
    device = next(network.parameters()).device
    if len(loader):  # streamed: one batch of whole images on the device at a time
        update_bn_stats(network, (normalize(stack_images(dicts, device)) for dicts in loader), num_iters=len(loader))
    layers = get_bn_modules(network)
    network.train(was_training)
    if comm.get_world_size() > 1:
        for m in layers:
            for buffer in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(buffer)
                buffer /= comm.get_world_size()
    return len(layers)


@META_ARCH_REGISTRY.register()
class DUDA(SelfTrainingArch):
    data_requirements = DataRequirements(
        source=True, source_labels=True, target=True, target_labels=False, target_full_image=True
    )

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__(cfg)
        if len(cfg.DATASETS.TARGET_TRAIN) != 1:
            raise ValueError("DUDA adapts to one target domain: DATASETS.TARGET_TRAIN must name one dataset")
        d = cfg.UDA.DUDA
        for key, allowed in [
            ("UPDATE_MODE", ("batch", "periodic")),
            ("BATCH_NORM", ("frozen_affine", "frozen_statistics", "trained")),
            ("TEACHER_FORWARDS", ("as_released", "eval")),
            ("TEACHER_BUFFERS", ("student", "own")),
        ]:
            if d[key] not in allowed:
                raise ValueError(f"UDA.DUDA.{key} must be one of {', '.join(allowed)}, not '{d[key]}'")
        self.warmup = int(d.SOURCE_WARMUP_ITERS)
        self.length = cfg.SOLVER.MAX_ITER - self.warmup
        self.alpha_range, self.alpha_ramp_start = tuple(d.ALPHA_RANGE), d.ALPHA_RAMP_START
        self.beta_range, self.beta_ramp_start, self.beta_cap = tuple(d.BETA_RANGE), d.BETA_RAMP_START, d.BETA_CAP
        self.power = d.SCHEDULE_POWER
        self.update_start, self.update_mode, self.refresh_period = d.UPDATE_START, d.UPDATE_MODE, d.REFRESH_PERIOD
        self.weights = {
            "offline": d.OFFLINE_WEIGHT,
            "consistency": d.CONSISTENCY_WEIGHT,
            "online": d.ONLINE_WEIGHT,
            "entropy": d.ENTROPY_WEIGHT,
            "kld": d.KLD_WEIGHT,
        }
        self.sce = (d.SCE_CE_WEIGHT, d.SCE_RCE_WEIGHT, d.RCE_LOG_CLAMP)
        self.offline_regularizers = d.OFFLINE_REGULARIZERS
        self.batch_norm, self.teacher_forwards = d.BATCH_NORM, d.TEACHER_FORWARDS
        self.teacher_buffers = d.TEACHER_BUFFERS
        self.resample_as_released = d.RESAMPLE_AS_RELEASED
        self.bn_recalibration_images = d.BN_RECALIBRATION_IMAGES
        self.num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.target_name = cfg.DATASETS.TARGET_TRAIN[0]
        keep = cfg.SOLVER.MAX_CHECKPOINTS_TO_KEEP
        self._bank_spec = (
            os.path.join(cfg.OUTPUT_DIR, "pseudo_label_bank", self.target_name),
            keep + 1 if keep > 0 else 1 << 30,  # + model_final
        )
        bank_cfg = cfg.UDA.PSEUDO_LABEL_BANK
        self.initial_dir = bank_cfg.INITIAL_DIR
        self.ias = (bank_cfg.IAS_PROPORTION, bank_cfg.IAS_MOMENTUM, bank_cfg.IAS_GAMMA)
        self._bank = None
        # The teacher's whole-image predictions of this step, for the bank update: per micro-batch, per image
        # (index, labels, confidence).
        self._pending: List[List[Tuple[int, torch.Tensor, torch.Tensor]]] = []
        self._bn_frozen = False
        if self.batch_norm == "frozen_affine":
            if self.warmup == 0:
                self._freeze_student_bn()  # before the optimizer and DDP see the parameters, as the release
            else:
                self.ddp_find_unused_parameters = True  # frozen when self-training starts, after DDP is built

    # ---------------------------------------------------------------------------------------- schedules
    def self_training_iteration(self, iteration: int) -> int:
        return iteration - self.warmup

    def alpha(self, it: int) -> float:
        return ramp(it, *self.alpha_range, self.alpha_ramp_start, self.length, self.power)

    def beta(self, it: int) -> float:
        if it < self.update_start:
            return self.beta_range[0]
        return ramp(it, *self.beta_range, self.beta_ramp_start, self.length, self.power)

    # ------------------------------------------------------------------------------------ the bank
    def pseudo_label_banks(self) -> List[PseudoLabelBank]:
        """One bank per target domain (built on first use: evaluation never needs the training set)."""
        if self._bank is None:
            root, keep = self._bank_spec
            names = [d["file_name"] for d in get_dataset_dicts([self.target_name])]
            self._bank = PseudoLabelBank(root, names, keep_pinned=keep)
        return [self._bank]

    def training_hooks(self, cfg: CfgNode) -> List:
        from uda_plugins.hooks import PseudoLabelBankHook, TeacherBatchNormHook

        hooks = super().training_hooks(cfg) + [PseudoLabelBankHook(self, cfg)]
        if self.bn_recalibration_images != 0:
            hooks.append(TeacherBatchNormHook(self, cfg))
        return hooks

    def _full_view_loader(self, cfg: CfgNode, limit: int = -1):
        per_rank = max(1, cfg.SOLVER.IMS_PER_BATCH_TARGET // comm.get_world_size())
        return build_full_view_loader(cfg, self.target_name, per_rank, limit)

    def initialize_bank(self, cfg: CfgNode) -> None:
        """Version 0 of the bank: copied from ``UDA.PSEUDO_LABEL_BANK.INITIAL_DIR``, or predicted by the student
        (the warm-up model) on whole images with IAST's selection. Collective; each process does its shard."""
        bank = self.pseudo_label_banks()[0]
        if self.initial_dir:
            logger.info("DUDA: initial pseudo-labels from %s", self.initial_dir)
            shard = range(comm.get_rank(), len(bank), comm.get_world_size())
            bank.initialize((i, read_initial_label(self.initial_dir, bank.keys[i])) for i in shard)
            return
        logger.info(
            "DUDA: generating the initial pseudo-labels with the student (IAST selection, proportion %s)", self.ias[0]
        )
        selector = InstanceAdaptiveSelector(self.num_classes, *self.ias, ignore_index=self.ignore_value)
        bank.initialize(ias_pseudo_labels(self.student, self._full_view_loader(cfg), selector))

    def commit_bank_update(self, cfg: CfgNode, iteration: int) -> None:
        """After the optimizer step of ``iteration``: the temporal-consistency rewrite of the bank. Collective."""
        it = self.self_training_iteration(iteration)
        if it < self.update_start:
            return
        bank = self.pseudo_label_banks()[0]
        if self.update_mode == "batch":
            pending, self._pending = self._pending, []
            with timed("bank_update"):
                beta = self.beta(it)
                bank.commit([update for batch in pending for update in self._rewrite(batch, beta)], iteration)
        elif (it - self.update_start) % self.refresh_period == 0:
            self.refresh_bank(cfg, iteration)

    def refresh_bank(self, cfg: CfgNode, iteration: int) -> None:
        """Rewrite the whole bank from the teacher's whole-image predictions, one commit per batch."""
        bank = self.pseudo_label_banks()[0]
        loader = self._full_view_loader(cfg)
        beta = self.beta(self.self_training_iteration(iteration))
        logger.info("DUDA: refreshing the pseudo-label bank at iteration %d (beta %.3f)", iteration, beta)

        def rewrites():
            for indices, probs in predict_full_views(self.teacher, loader, self.student.normalize):
                confidence, labels = class_maximum(probs)
                yield self._rewrite(list(zip(indices, labels, confidence)), beta)

        commit_in_batches(bank, rewrites(), loader.batch_size, iteration)

    def _rewrite(self, pending, beta: float) -> List[Tuple[int, np.ndarray]]:
        """The new labels of one batch (one rank's micro-batch: BETA thresholds over it, as the reference's per-GPU
        batch, so K micro-batches on W processes equal K*W processes)."""
        if not pending:
            return []
        bank = self.pseudo_label_banks()[0]
        confidence = torch.cat([c.reshape(-1) for _, _, c in pending])
        labels = torch.cat([p.reshape(-1) for _, p, _ in pending])
        thresholds = class_percentile_thresholds(confidence, labels, beta, self.num_classes).clamp(max=self.beta_cap)
        out = []
        for index, prediction, conf in pending:
            candidate = torch.where(conf < thresholds[prediction], self.ignore_value, prediction)
            old = bank.read(index)[0]
            if old.shape != tuple(prediction.shape):
                old = cv2.resize(old, prediction.shape[::-1], interpolation=cv2.INTER_NEAREST)
            old = torch.from_numpy(old).to(prediction.device).long()
            new = temporal_consistency_update(old, prediction, candidate, self.ignore_value)
            out.append((index, new.to(torch.uint8).cpu().numpy()))
        return out

    # ------------------------------------------------------------------------------------- teacher
    @torch.no_grad()
    def update_teacher(self) -> None:
        if get_event_storage().iter < self.warmup:
            copy_parameters_(self.teacher, self.student)  # the mean starts from the warm-up model
            return
        super().update_teacher()
        if self.teacher_buffers == "student":  # AveragedModel.update_parameters with use_buffers=False
            for mine, theirs in zip(self.teacher.buffers(), self.student.buffers()):
                mine.copy_(theirs)

    def train(self, mode: bool = True) -> "DUDA":
        super().train(mode)
        self.teacher.eval()  # outside its train-mode forwards the mean model predicts with its statistics
        if self._bn_frozen:
            self._freeze_student_bn()
        return self

    def _student_batch_norms(self) -> List[nn.Module]:
        return [m for m in self.student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _freeze_student_bn(self) -> None:
        """From the start of self-training: BatchNorm as ``UDA.DUDA.BATCH_NORM`` says."""
        self._bn_frozen = True
        for m in self._student_batch_norms():
            if self.batch_norm == "frozen_statistics":
                m.eval()
            elif self.batch_norm == "frozen_affine":
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.requires_grad_(False)

    def recalibrate_teacher_bn(self, cfg: CfgNode) -> None:
        loader = self._full_view_loader(cfg, self.bn_recalibration_images)
        with timed("bn_recalibration"):
            n = recalibrate_batch_norm(self.teacher, loader, self.student.normalize)
        if n:
            logger.info("DUDA: re-estimated the teacher's BatchNorm statistics (%d layers) on target images", n)

    # ---------------------------------------------------------------------------------------- step
    def offline_labels(self, dicts: List[dict]) -> torch.Tensor:
        """The bank's current labels of the target crops (re-read here if a worker read an older version)."""
        crops = self.pseudo_label_banks()[0].crops_of(dicts)
        labels = torch.stack([torch.from_numpy(np.asarray(c)).long() for c in crops])
        return labels.to(self.device, non_blocking=True)

    def _target_losses(
        self, logits: torch.Tensor, offline: torch.Tensor, online: torch.Tensor, probs: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """The student's target losses on its crop ``logits``: symmetric CE to the ``offline`` bank labels, MSE to the
        mean teacher's ``probs``, CE to the ``online`` labels and the dual regularisers on the pixels without them."""
        w, losses = self.weights, {}
        ce_weight, rce_weight, log_clamp = self.sce
        losses["loss_offline"] = w["offline"] * symmetric_cross_entropy(
            logits, offline, ce_weight, rce_weight, log_clamp, self.ignore_value
        )
        # The mean model's softmax carried to the crop (a resized probability map: the softmax of the resized
        # logits in the reference; equal up to interpolation).
        losses["loss_consistency"] = w["consistency"] * F.mse_loss(torch.softmax(logits, dim=1), probs)
        valid = online != self.ignore_value
        ce = F.cross_entropy(logits, torch.where(valid, online, 0), reduction="none")
        losses["loss_online"] = w["online"] * (ce * valid).sum() / valid.sum().clamp(min=1)
        losses["loss_entropy"] = w["entropy"] * entropy_regularizer(logits, (~valid).float())
        losses["loss_kld"] = w["kld"] * kld_uniform_regularizer(logits, valid.float())
        if self.offline_regularizers:
            offline_valid = offline != self.ignore_value
            losses["loss_offline_entropy"] = 2.0 * entropy_regularizer(logits, (~offline_valid).float())
            losses["loss_offline_kld"] = 0.1 * kld_uniform_regularizer(logits, offline_valid.float())
        return losses

    def _teacher_train_mode_forwards(self, crops: torch.Tensor, full: torch.Tensor):
        """As released (``uda_trainer.py:309,331-332``): the mean model in train mode on the student's crops (the
        output discarded, but its BatchNorm statistics move) and then on the whole images, whose logits are the
        consistency target; both with batch statistics and dropout. None with ``TEACHER_FORWARDS eval``: the
        eval-mode forward that follows serves the consistency target too."""
        if self.teacher_forwards != "as_released":
            return None
        self.teacher.train()
        try:
            self.teacher(crops)
            return self._whole_image_logits(full)
        finally:
            self.teacher.eval()

    def _whole_image_logits(self, full: torch.Tensor) -> torch.Tensor:
        """The teacher's logits at the whole images' resolution (``UpsamplePredictor``: align_corners=True as
        released)."""
        return upsample_like(self.teacher(full), full.shape[-2:], align_corners=self.resample_as_released).float()

    def _carried_to_crops(self, full_logits: torch.Tensor, dicts: List[dict]) -> torch.Tensor:
        """Class probabilities of whole-image logits on each sample's crop, by its recorded geometry: as released
        the logits are carried (``full2weak_logits``, align_corners=True) and then softmaxed; otherwise the
        probabilities are carried with align_corners=False."""
        aligned = self.resample_as_released
        maps = full_logits if aligned else torch.softmax(full_logits, dim=1)
        crops = torch.stack(
            [
                apply_geometry_tensor(maps[i], Geometry.from_dict(d["geometry"]), align_corners=aligned)
                for i, d in enumerate(dicts)
            ]
        )
        return torch.softmax(crops, dim=1) if aligned else crops

    def forward_train(self, batch: Dict[str, list]) -> Dict[str, torch.Tensor]:
        iteration = get_event_storage().iter
        it = self.self_training_iteration(iteration)
        if it >= 0 and not self._bn_frozen:
            self._freeze_student_bn()  # first thing in the step: a resumed run freezes at the same point
        source_images, source_labels = self.images_and_labels(batch["source"])
        losses, source_out = self.source_losses(source_images, source_labels)
        visualize = self.should_visualize()
        if visualize:
            self.visualize("source/input_gt_pred", source_images, source_labels, source_out.logits)
        if it < 0:
            return losses  # the source-only warm-up
        if len(batch["target"]) != 1:
            raise ValueError("DUDA adapts to one target domain")
        dicts = batch["target"][0]
        crops = self.student.normalize(stack_images(dicts, self.device))
        with timed("pseudo_labels"):
            offline = self.offline_labels(dicts)
        with torch.no_grad(), timed("teacher_forward"):
            full = self.student.normalize(stack_images(dicts, self.device, key="full_image"))
            consistency_logits = self._teacher_train_mode_forwards(crops, full)
            full_logits = self._whole_image_logits(full)  # eval mode
        with torch.no_grad(), timed("pseudo_labels"):
            full_probs = torch.softmax(full_logits, dim=1)
            probs = self._carried_to_crops(full_logits, dicts)
            target = probs if consistency_logits is None else self._carried_to_crops(consistency_logits, dicts)
            online, _, _ = keep_top_fraction(probs, self.alpha(it), self.ignore_value)
            if self.update_mode == "batch" and it >= self.update_start:
                confidence, labels = class_maximum(full_probs)
                self._pending.append([(d["dataset_index"], labels[i], confidence[i]) for i, d in enumerate(dicts)])
        with timed("student_forward"):  # the forward with its losses, as every method times them
            out = self.student.forward_train(crops)
            logits = upsample_like(out.logits, crops.shape[-2:], align_corners=self.resample_as_released).float()
            losses.update(self._target_losses(logits, offline, online, target))
        if self.first_micro_batch:
            get_event_storage().put_scalars(duda_alpha=self.alpha(it), duda_beta=self.beta(it), smoothing_hint=False)
        if visualize:
            self.visualize_panel("target/crop_offline_online_teacher_pred", [crops, offline, online, probs, logits])
        return losses


def ias_pseudo_labels(
    network: nn.Module, loader, selector: InstanceAdaptiveSelector
) -> Iterator[Tuple[int, np.ndarray]]:
    """(dataset index, uint8 pseudo-label) of every image of a full-view loader, in order, selected by IAST's
    instance-adaptive thresholds from ``network``'s predictions."""
    for indices, probs in predict_full_views(network, loader, network.normalize):
        confidence, labels = class_maximum(probs)
        confidence, labels = confidence.cpu().numpy(), labels.cpu().numpy()
        for k, index in enumerate(indices):
            yield index, selector(confidence[k], labels[k])
