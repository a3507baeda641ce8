"""STAL / ILM-ASSL — the semi-supervised learner of the active-learning loop (arXiv 2301.13361).

Follows licongguan/ILM-ASSL ``train.py`` (``train``) with ``experiments/gtav2cityscapes/2.2%/config.yaml``: a mean
teacher (EMA 0.99) on a labelled pool — the source images plus a few labelled target images oversampled in the
source stream (``DATASETS.TARGET_LABELED_LIST``; ``tools/active_learning_round.py`` picks them) — and the
unlabelled target images. One iteration (``UDA.STAL``, pieces in :mod:`uda_plugins.methods.semi_supervised`):

1. classes for the adaptive augmentations: three draws from the non-dominant classes with P ~ exp(sqrt(1 - cc_c)),
   cc = each class's running confidence (the "class criterion");
2. **adaptive copy-paste** on the labelled batch: the pixels of those classes of another labelled sample pasted in
   (for half the samples, as released: a second sample the loader draws at its own scale, ``PASTE_PARTNER``);
3. **adaptive CutMix** on the unlabelled images: for each target image a partner from the CutMix bank showing a
   class drawn with P ~ exp(1 - cc_c); the teacher (eval mode) predicts both; the box of a random connected region
   of that class in the partner's prediction (or a random half-area box) is pasted, and the teacher's
   predictions are mixed alike; the bank records the classes each image shows;
4. the teacher (train mode, as released: its BatchNorm statistics come from these forwards) labels the labelled
   batch (before step 3, as released) and sees the mixed unlabelled batch (after it; its representation feeds the
   contrastive term); the mixed unlabelled labels lose a shrinking share of their pixels by entropy (20% -> 0% over
   training);
5. the student: ``L_sup`` = OHEM cross-entropy of the main head + 0.4 x that of the auxiliary head on layer3 (mined
   per group of ``LABELED_GROUP_SIZE`` images as on the release's GPUs, the groups averaged);
   the class criterion moves towards the student's class confidence on the labelled pixels (momentum 0.999);
   ``L_cons`` = the teacher's labels weighted by its confidence squared with adaptive equalisation sampling, on the
   labelled and the mixed unlabelled images;
6. from ``CONTRASTIVE_START_ITER``, U2PL's pixel contrastive loss on the head's representation (weight 0.1, per-class
   queues of teacher features; :func:`~uda_plugins.methods.semi_supervised.pixel_contrastive_loss`), its samples as
   U2PL's paper defines them or, ``CONTRASTIVE_AS_RELEASED``, as its code draws them (A2, B7, B8);
   ``L = (L_sup + L_cons) / LOSS_DIVISOR + 0.1 L_contra / LOSS_DIVISOR ** CONTRASTIVE_DIVISOR_POWER``.

Decisions (docs/methods.md §6.9): the class criterion and the CutMix bank are averaged / gathered over processes,
so every process holds the checkpointed state (the reference keeps one per GPU).

Differences from the release (docs/release-audit/stal-ilm-assl.md; the switch that reproduces it, or why none;
``UDA.RELEASE_FIDELITY`` moves the listed ones together). The paper configs set every switch as released.

====  ==========================================================================  =================================
item  difference                                                                   as released
====  ==========================================================================  =================================
A1    none: 769x769 crops padded in the centre, padded labels road                ``CROP_PAD center``,
                                                                                   ``CROP_PAD_LABEL 0``
A2    none: the contrastive samples as released: the labels (nearest) and the     ``CONTRASTIVE_AS_RELEASED``
      teacher's probabilities (bilinear, align_corners=True) resized from 769 to
      193 are read up to 3 pixels apart, after the CutMix at full resolution, so
      the release's rule (B8) finds a few negatives a step (the audit's replay:
      10-57; the tests' synthetic steps: 50-62); class i's anchors and prototype
      meet the queue of the i-th class present (U2PL issue #111). The fix
      (U2PL's paper): align_corners=False, B8's negatives, each class its queue
A3    none: the contrastive term divided by the GPUs twice                         ``CONTRASTIVE_DIVISOR_POWER 2``
A4    none: a paste onto half the labelled samples, of a second labelled sample  ``COPY_PASTE_PROB 0.5``,
      drawn by the loader at 0.1-2.0; a GTA5/SYNTHIA one read raw: its file's     ``PASTE_PARTNER second_sample``,
      size, its label PNG's grey levels (only GTA5's cars, as train, and          ``PASTE_RATIO_RANGE (0.1, 2.0)``,
      trailers, as car, ever match a query class; SYNTHIA's are 0)                ``PASTE_RAW_SOURCE_LABELS``
A5    none: the unlabelled filter drops the most confident pixels                 ``ENTROPY_FILTER_AS_RELEASED``
A6    none in the paper configs: the release's 2000 source images (59.6% of the   ``DATASETS.SOURCE_LIST`` (the
      labelled stream is Cityscapes at 1%; 10.6% with all of GTA5, 23.9% with     list tools/convert_ilm_assl_list.py
      all of SYNTHIA: SOURCE_LIST "")                                             writes; required, not shipped)
A7    none: SyncBN over the processes (4 processes of one image each run)         ``NORM SyncBN``
B1    none: the unlabelled stream and the CutMix partners without the labelled    ``DATASETS.TARGET_EXCLUDE_LABELED``
      targets (the library's default: every target image is also unlabelled)
B2    none (= A1's geometry: a scale from [0.5, 1] or [1, 2])                     ``RATIO_SAMPLING split_at_one``
B3    none: the source stretched to 2048x1024                                     ``RESIZE_MODE exact``
B4    SYNTHIA labels resized by nearest neighbour (the release: bilinear on ids)  no switch (a fix)
B5    none for the input: the score sees the image squashed to 769x769           ``UDA.ACTIVE.SCORE_INPUT_SIZE
      (align_corners=True), its logits upsampled to 1024x2048 alike; the          (769, 769)``; the round tool on
      network: the round tool scores MODEL.WEIGHTS, the in-run rounds the         B11's model_best_on_test.pth
      current teacher (the release: the best-on-val teacher checkpoint)
B6    documentation: the 5% lists are one round of 120 from the 1% model          —
B7    none: ``label_onehot``'s batch slot 0: only the first labelled image has    ``CONTRASTIVE_AS_RELEASED``
      labels (anchors, prototype pixels), the union of the labelled batch's (and
      the first unlabelled image, of the unlabelled part's). The release's
      per-GPU batch is 4 + 1 (4 processes, as A7); one process: unions of 16, 4
B8    none: a negative of class c must be labelled c and ranked 4th-20th by the   ``CONTRASTIVE_AS_RELEASED``
      teacher (no labelled pixel can be one; U2PL issues #171, #27). The fix
      (U2PL's paper): pixels not of c that rank c in the top 3 (labelled) or
      4th-20th (unlabelled), about 4x10^5 a step against the release's dozens
B9    the class criterion and bank synchronised over processes (the release:      no switch
      per GPU, rank 0's saved)
B10   none: OHEM's minimum kept, the consistency's normalisation and the         ``LABELED_GROUP_SIZE 4``,
      unlabelled filter's entropy percentile per GPU's 4 labelled / 1             ``UNLABELED_GROUP_SIZE 1``
      unlabelled images, on any number of processes (0: per process); the
      contrastive term's entropy percentiles are still per process
B11   the paper configs evaluate at full resolution with windows, last           ``TEST.CENTER_CROP (769, 769)``,
      checkpoint (the release: val centre crops every epoch, the best teacher's   ``EVAL_MODEL both``,
      checkpoint kept; its eval.py then both networks of it at full resolution)   ``SAVE_BEST_ON_TEST``,
                                                                                   ``BEST_ON_TEST_MODEL teacher``
B12   the equalisation sampling's random field per pixel and image (the release:  no switch
      one per class, shared by the batch)
C1    36000 iterations at 4 GPUs (the release: 36800 / 36400 / 35200 at 1 /      ``SOLVER.MAX_ITER``
      2.2 / 5%)
C2    the EMA ramp's first update (MIC's form)                                     no switch
C3    the unlabelled drop percentage decays per iteration (the release: epoch)   no switch
C4    no update of the representation branch before the contrastive start (the    no switch
      release: zero gradients with weight decay and momentum)
C5    timm's max-pool ceil_mode False (equal at 769; differs for 1024-high         no switch
      whole-image scoring)
C6    the contrastive queues float16 and checkpointed (the release: float32,      no switch (a fix)
      empty after a resume)
C7    documentation corrected (configs/README.md)                                  —
C8    documentation: 7 SYNTHIA classes disagree with the 19-class model, not 10   —
C9    resizing with align_corners=False, no conv bias before BN (A2's switch     no switch
      resamples these full-resolution logits as the release resamples its own)
====  ==========================================================================  =================================
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from uda_plugins.d2 import META_ARCH_REGISTRY, CfgNode, comm, get_event_storage
from uda_plugins.data.build import PASTE_PARTNERS, DataRequirements, get_dataset_dicts
from uda_plugins.data.mapper import UDADatasetMapper
from uda_plugins.modeling import class_maximum, predicted_classes, stack_images
from uda_plugins.modeling.heads.deeplabv3plus import AuxiliaryHead
from uda_plugins.modeling.losses import upsample_like
from uda_plugins.utils.profiling import timed

from .self_training import SelfTrainingArch
from .semi_supervised import (
    ContrastiveDraw,
    ContrastQueues,
    batch_groups,
    class_confidence,
    confidence_weighted_consistency,
    contrastive_inputs,
    copy_paste,
    cutmix_box,
    draw_contrastive_samples,
    draw_contrastive_samples_as_released,
    draw_cutmix_source,
    draw_query_classes,
    filter_unlabelled_pseudo_labels,
    info_nce_loss,
    label_probability,
    ohem_cross_entropy,
    paste_with_probability,
    update_cutmix_bank,
)

__all__ = ["STAL"]


@META_ARCH_REGISTRY.register()
class STAL(SelfTrainingArch):
    data_requirements = DataRequirements(
        source=True, source_labels=True, target=True, target_labels=False, labelled_paste=True
    )

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__(cfg)
        if len(cfg.DATASETS.TARGET_TRAIN) != 1:
            raise ValueError("STAL adapts to one target domain: DATASETS.TARGET_TRAIN must name one dataset")
        s = cfg.UDA.STAL
        C = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.num_classes = C
        self.aux_feature, self.aux_weight = s.AUX_FEATURE, s.AUX_WEIGHT
        channels = self.student.backbone.output_shape()[s.AUX_FEATURE].channels
        self.aux_head = AuxiliaryHead(channels, C, cfg.MODEL.SEM_SEG_HEAD.NORM)
        self.ohem = (s.OHEM_THRESH, s.OHEM_MIN_KEPT)
        self.consistency_weight, self.confidence_gamma = s.CONSISTENCY_WEIGHT, s.CONFIDENCE_GAMMA
        self.equalisation_sampling, self.sampling_gamma = s.EQUALISATION_SAMPLING, s.SAMPLING_GAMMA
        self.class_momentum = s.CLASS_MOMENTUM
        self.adaptive_classes = [c for c in range(C) if c not in set(s.ADAPTIVE_CLASSES_IGNORED)]
        self.copy_paste_draws, self.copy_paste_prob = s.COPY_PASTE_CLASSES, float(s.COPY_PASTE_PROB)
        if s.PASTE_PARTNER not in PASTE_PARTNERS:
            raise ValueError(f"UDA.STAL.PASTE_PARTNER must be one of {PASTE_PARTNERS}, not '{s.PASTE_PARTNER}'")
        self.paste_partner = s.PASTE_PARTNER
        self.cutmix, self.cutmix_area, self.bank_area = s.CUTMIX, s.CUTMIX_AREA_THRESH, s.CUTMIX_BANK_AREA_THRESH
        self.drop_percent, self.as_released = s.UNLABELED_DROP_PERCENT, s.ENTROPY_FILTER_AS_RELEASED
        self.max_iter = cfg.SOLVER.MAX_ITER
        # The release's per-GPU batch statistics (B10): groups of this many labelled / unlabelled images (0: all).
        self.group_sizes = (int(s.LABELED_GROUP_SIZE), int(s.UNLABELED_GROUP_SIZE))
        self.loss_divisor = float(s.LOSS_DIVISOR)
        self.contrastive_divisor = self.loss_divisor ** int(s.CONTRASTIVE_DIVISOR_POWER)
        self.target_name = cfg.DATASETS.TARGET_TRAIN[0]
        self._target_mapper = UDADatasetMapper.from_config(cfg, "target", load_label=False)
        self._target_dicts = None
        # State, checkpointed with the model: the class criterion (the reference starts it uniformly at random) and
        # the CutMix bank (which classes each target image shows, per the teacher).
        generator = torch.Generator().manual_seed(int(cfg.SEED) if cfg.SEED >= 0 else 0)
        self.register_buffer("class_criterion", torch.rand(C, generator=generator))
        self.register_buffer("cutmix_bank", torch.zeros(C, len(self.target_dicts()), dtype=torch.uint8))
        # The target images a CutMix partner may be (None: all): the unlabelled stream's, which the loader names
        # (use_target_pools; without the labelled ones under DATASETS.TARGET_EXCLUDE_LABELED, as released).
        self.cutmix_pool: Optional[torch.Tensor] = None
        self.contrastive_weight, self.contrastive_start = s.CONTRASTIVE_WEIGHT, s.CONTRASTIVE_START_ITER
        self.contrastive = None
        # The head's representation branch has no gradient while the contrastive term is off (before its start, or
        # always with weight 0): DDP must not wait for it.
        self.ddp_find_unused_parameters = hasattr(self.student.head, "representation") and (
            self.contrastive_weight <= 0 or self.contrastive_start > 0
        )
        if self.contrastive_weight > 0:
            if not hasattr(self.student.head, "forward_with_representation"):
                raise ValueError(
                    "UDA.STAL.CONTRASTIVE_WEIGHT > 0 needs a head with a representation branch "
                    "(MODEL.SEM_SEG_HEAD.NAME DeepLabV3PlusHead), or set it to 0"
                )
            self.contrastive = dict(
                class_threshold=s.ANCHOR_THRESHOLD,
                low_rank=s.LOW_RANK,
                high_rank=s.HIGH_RANK,
                num_queries=s.NUM_QUERIES,
                num_negatives=s.NUM_NEGATIVES,
            )
            self.temperature = s.TEMPERATURE
            self.contrastive_as_released = s.CONTRASTIVE_AS_RELEASED
            self.entropy_percents = (s.LOW_ENTROPY_PERCENT, s.HIGH_ENTROPY_PERCENT)
            capacities = [s.FIRST_CLASS_QUEUE_SIZE] + [s.QUEUE_SIZE] * (C - 1)
            self.queues = ContrastQueues(capacities, dim=self.student.head.representation_dim)

    def use_target_pools(self, pools: List[Optional[List[int]]]) -> None:
        """The images each target stream draws (None: all), from the loader: CutMix partners come from the first's."""
        if pools[0] is None:
            self.cutmix_pool = None
            return
        self.cutmix_pool = torch.zeros(self.cutmix_bank.shape[1], dtype=torch.bool)
        self.cutmix_pool[pools[0]] = True

    def target_dicts(self) -> List[dict]:
        if self._target_dicts is None:
            self._target_dicts = get_dataset_dicts([self.target_name])
        return self._target_dicts

    # ------------------------------------------------------------------------------------------ pieces
    @staticmethod
    def _logits_and_representation(network, images: torch.Tensor, representation: bool):
        """``network``'s head logits and, when asked, its representation (else None) on normalised ``images``,
        with the backbone features."""
        features = network.extract_features(images)
        if representation:
            logits, rep = network.head.forward_with_representation(features)
            return logits, rep, features
        return network.decode(features), None, features

    def _student(self, images: torch.Tensor, representation: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(main, auxiliary) logits of the student at the input size, and its representation (or None)."""
        logits, rep, features = self._logits_and_representation(self.student, images, representation)
        main = upsample_like(logits, images.shape[-2:])
        aux = upsample_like(self.aux_head(features[self.aux_feature]), images.shape[-2:])
        return main.float(), aux.float(), rep

    @torch.no_grad()
    def _teacher_train_mode(self, images: torch.Tensor, representation: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits at the input size and representation (or None), in training mode as released."""
        self.teacher.train()
        logits, rep, _ = self._logits_and_representation(self.teacher, images, representation)
        self.teacher.eval()
        return upsample_like(logits, images.shape[-2:]).float(), rep

    @torch.no_grad()
    def _contrastive_draw(
        self, teacher_reps, labels, pseudo_u, teacher_logits: List[torch.Tensor], entropy_u
    ) -> Optional[ContrastiveDraw]:
        """The samples of U2PL's contrastive term on the labelled then the mixed unlabelled images, at the
        representation size (pushes this step's negatives into the queues); with ``CONTRASTIVE_AS_RELEASED``,
        formed and drawn as the release does (A2)."""
        inputs = contrastive_inputs(
            labels,
            pseudo_u,
            teacher_logits,
            entropy_u,
            teacher_reps.shape[-2:],
            *self.entropy_percents,
            align_corners=self.contrastive_as_released,
            ignore=self.ignore_value,
        )
        draw = draw_contrastive_samples_as_released if self.contrastive_as_released else draw_contrastive_samples
        return draw(teacher_reps, *inputs, len(labels), self.queues, **self.contrastive)

    def _paste_samples(self, batch: Dict[str, list], images: torch.Tensor, labels: torch.Tensor):
        """(normalised images, labels) pasted onto the labelled batch (all-zero where a sample gets no paste): the
        loader's second samples (``PASTE_PARTNER second_sample``, as released) or the next sample of the batch."""
        if self.paste_partner == "batch":
            return images.roll(1, 0), paste_with_probability(labels.roll(1, 0), self.copy_paste_prob)
        paste_images, paste_labels = torch.zeros_like(images), torch.zeros_like(labels)
        dicts = batch.get("labelled_paste")
        if dicts is None and self.copy_paste_prob <= 0:
            return paste_images, paste_labels
        if dicts is None or len(dicts) != len(images):
            raise ValueError(
                f"STAL pastes one second sample per labelled sample from batch['labelled_paste'], which holds "
                f"{len(dicts or [])} for {len(images)}: train with the loader of STAL's data_requirements, or set "
                "UDA.STAL.PASTE_PARTNER batch"
            )
        pasted = [k for k, d in enumerate(dicts) if d["pasted"]]
        if pasted:
            drawn, drawn_labels = self.images_and_labels([dicts[k] for k in pasted])
            if drawn.shape[-2:] != images.shape[-2:]:
                raise ValueError(f"Paste samples of {tuple(drawn.shape[-2:])} for crops of {tuple(images.shape[-2:])}")
            paste_images[pasted], paste_labels[pasted] = drawn, drawn_labels
        return paste_images, paste_labels

    def _partner(self, index: int) -> torch.Tensor:
        """A training crop (RGB 0..255) of target image ``index``, drawn with the step's seeded RNG."""
        rng = np.random.default_rng(int(torch.randint(2**31, ())))
        return self._target_mapper(self.target_dicts()[index], rng=rng)["image"]

    @torch.no_grad()
    def _mixed_unlabelled(self, dicts: List[dict]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adaptive CutMix of the target batch with partners from the bank: (mixed normalised images, the teacher's
        mixed logits, the CutMix masks). Updates the bank (gathered over processes)."""
        images = self.student.normalize(stack_images(dicts, self.device))
        self.teacher.eval()
        with timed("teacher_forward"):
            logits = self.teacher.predict(images).float()
        if not self.cutmix:
            return images, logits, torch.zeros_like(images[:, 0])
        partners, classes, indices = [], [], []
        with timed("partner_loading"):
            for _ in dicts:
                index, c = draw_cutmix_source(self.cutmix_bank, self.class_criterion, self.cutmix_pool)
                partners.append(self._partner(index))
                classes.append(c)
                indices.append(index)
            partner_images = self.student.normalize(torch.stack(partners).to(self.device).float())
        with timed("teacher_forward"):
            partner_logits = self.teacher.predict(partner_images).float()
        with timed("mixing"):
            masks = torch.zeros_like(images[:, 0])
            partner_predictions = predicted_classes(partner_logits)
            for k, c in enumerate(classes):
                y0, x0, y1, x1 = cutmix_box(partner_predictions[k].cpu().numpy(), c, self.cutmix_area)
                masks[k, y0:y1, x0:x1] = 1
            own = [d["dataset_index"] for d in dicts]
            predictions = torch.cat([predicted_classes(logits), partner_predictions])
            self._update_bank(predictions, own + indices)
            m = masks[:, None].bool()
            return torch.where(m, partner_images, images), torch.where(m, partner_logits, logits), masks

    def _groups(self, batch_size: int, labelled: bool) -> List[slice]:
        key = "UDA.STAL.LABELED_GROUP_SIZE" if labelled else "UDA.STAL.UNLABELED_GROUP_SIZE"
        return batch_groups(batch_size, self.group_sizes[0 if labelled else 1], key)

    def _supervised(self, main: torch.Tensor, aux: torch.Tensor, labels: torch.Tensor, label_prob: torch.Tensor):
        """OHEM of the main head + aux weight x that of the auxiliary head, mined and averaged per group of labelled
        images (the release's per-GPU ``OhemCrossEntropy2dTensor``, loss_helper.py:564-593), the groups' losses
        averaged as DDP averages the GPUs' gradients."""
        thresh, min_kept = self.ohem
        groups = self._groups(len(labels), labelled=True)
        total = 0.0
        for g in groups:
            total = total + ohem_cross_entropy(main[g], labels[g], thresh, min_kept, self.ignore_value, label_prob[g])
            total = total + self.aux_weight * ohem_cross_entropy(aux[g], labels[g], thresh, min_kept, self.ignore_value)
        return total / len(groups)

    def _consistency(self, logits, confidence, pseudo_labels, labelled: bool) -> torch.Tensor:
        """The confidence-weighted consistency, its weights normalised per group (the release's per-GPU
        ``Criterion_cons``, loss_helper.py:376), the groups averaged."""
        criterion = self.class_criterion if self.equalisation_sampling else None
        groups = self._groups(len(logits), labelled)
        gammas = (self.confidence_gamma, self.sampling_gamma)
        ignore = 255 if labelled else self.ignore_value
        total = 0.0
        for g in groups:
            total = total + confidence_weighted_consistency(
                logits[g], confidence[g], pseudo_labels[g], criterion, *gammas, ignore
            )
        return total / len(groups)

    def _filter_unlabelled(self, pseudo_u: torch.Tensor, entropy: torch.Tensor, percent: float) -> torch.Tensor:
        """The unlabelled pseudo-labels filtered by an entropy percentile of each group (the release: of its one
        mixed image per GPU, train.py:552)."""
        groups = self._groups(len(pseudo_u), labelled=False)
        return torch.cat(
            [
                filter_unlabelled_pseudo_labels(pseudo_u[g], entropy[g], percent, self.as_released, self.ignore_value)
                for g in groups
            ]
        )

    def _update_bank(self, predictions: torch.Tensor, indices: List[int]) -> None:
        if comm.get_world_size() > 1:  # every process applies every process's updates, in rank order
            gathered = comm.all_gather((predictions.cpu(), indices))
            for p, idx in gathered:
                update_cutmix_bank(self.cutmix_bank, p, idx, self.bank_area)
        else:
            update_cutmix_bank(self.cutmix_bank, predictions, indices, self.bank_area)

    def _update_class_criterion(self, label_prob: torch.Tensor, labels: torch.Tensor) -> None:
        value = class_confidence(label_prob, labels, self.num_classes)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(value)
            value /= comm.get_world_size()
        self.class_criterion.mul_(self.class_momentum).add_(
            value.to(self.class_criterion), alpha=1 - self.class_momentum
        )

    # -------------------------------------------------------------------------------------------- step
    def forward_train(self, batch: Dict[str, list]) -> Dict[str, torch.Tensor]:
        iteration = get_event_storage().iter
        images, labels = self.images_and_labels(batch["source"])
        with timed("mixing"):
            query = draw_query_classes(self.class_criterion, self.adaptive_classes, self.copy_paste_draws)
            if self.copy_paste_draws > 0 and (len(images) > 1 or self.paste_partner == "second_sample"):
                paste_images, paste_labels = self._paste_samples(batch, images, labels)
                images, labels = copy_paste(images, labels, paste_images, paste_labels, query)
        contrast = self.contrastive is not None and iteration >= self.contrastive_start
        # The teacher's forwards in the release's order and modes. Its BatchNorm running statistics (the EMA copies
        # parameters only) come from its training-mode forwards: the labelled batch, then the mixed unlabelled one
        # on every iteration (its representation is used only by the contrastive term); the pseudo-labels of the
        # unlabelled images come from an eval-mode forward in between.
        with timed("teacher_forward"):
            teacher_labelled, teacher_rep_l = self._teacher_train_mode(images, contrast)
        unlabelled, teacher_unlabelled, masks = self._mixed_unlabelled(batch["target"][0])
        with timed("teacher_forward"):
            teacher_rep_u = self._teacher_train_mode(unlabelled, contrast)[1]
        with timed("pseudo_labels"):
            confidence_l, pseudo_l = class_maximum(torch.softmax(teacher_labelled, 1))
            probs_u = torch.softmax(teacher_unlabelled, 1)
            confidence_u, pseudo_u = class_maximum(probs_u)
            entropy = probs_u.add(1e-10).log_().mul_(probs_u).sum(1).neg_()  # -(p log(p + 1e-10)), in place
            percent = self.drop_percent * (1 - iteration / self.max_iter)
            pseudo_u = self._filter_unlabelled(pseudo_u, entropy, percent)
        with timed("student_forward"):  # the forwards with their losses (OHEM is U2PL's loss function)
            main_l, aux_l, rep_l = self._student(images, contrast)
            main_u, _, rep_u = self._student(unlabelled, contrast)
            # each labelled pixel's probability of its label: what OHEM mines, and the class criterion's input
            probability_l = label_probability(main_l, labels, self.num_classes)
            supervised = self._supervised(main_l, aux_l, labels, probability_l)
            losses = {"loss_supervised": supervised / self.loss_divisor}
        with torch.no_grad():
            self._update_class_criterion(probability_l, labels)
        with timed("student_forward"):
            consistency = self._consistency(main_l, confidence_l, pseudo_l, labelled=True)
            consistency = consistency + self._consistency(main_u, confidence_u, pseudo_u, labelled=False)
            losses["loss_consistency"] = self.consistency_weight * consistency / self.loss_divisor
        if contrast:
            with timed("contrastive"):  # the sampling: queues, anchors and negatives
                draw = self._contrastive_draw(
                    torch.cat([teacher_rep_l, teacher_rep_u]),
                    labels,
                    pseudo_u,
                    [teacher_labelled, teacher_unlabelled],
                    entropy,
                )
            with timed("student_forward"):  # the InfoNCE on the student's representation: a loss, like OHEM
                loss = info_nce_loss(torch.cat([rep_l, rep_u]), draw, self.temperature)
            losses["loss_contrastive"] = self.contrastive_weight * loss / self.contrastive_divisor
        if self.first_micro_batch:
            storage = get_event_storage()
            storage.put_scalar("stal/unlabelled_kept", float((pseudo_u != self.ignore_value).float().mean()))
            storage.put_scalar("stal/cutmix_area", float(masks.mean()))
        if self.should_visualize():
            self.visualize("labelled/input_gt_pred", images, labels, main_l)
            self.visualize_panel("unlabelled/mixed_mask_pseudolabel_pred", [unlabelled, masks, pseudo_u, main_u])
        return losses
