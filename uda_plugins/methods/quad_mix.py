"""UDASS / QuadMix (Zhang et al., TPAMI 2025), image part: DACS/MIC, then four-way mixing across two batches.

Follows ZHE-SAPI/UDASS ``image_udass/seg/mmseg/models/uda/ok/dacs_gta.py`` (``DACS.forward_train``, ``rand_mixer``;
``ok/dacs_syn.py`` and the ``*_cnn.py`` variants differ in constants only) and
``image_udass/seg/mmseg/models/utils/dacs_transforms_zz.py`` (the masks: :mod:`uda_plugins.methods.quad_mix_masks`).
docs/methods.md §4 describes the method step by step.

* **Phase A** (storage iteration < ``UDA.QUADMIX.START_ITER``): exactly :class:`~uda_plugins.methods.dacs.DACS` as
  configured (ClassMix, MIC, the feature distance; the reference switches after MIC's warm-up).
* **Phase B**: the DACS mix loss is replaced by two losses on images mixing the previous and the current batch:
  the previous source image's ``CLASSES_PER_MASK`` classes pasted on the current source (S2S) and target (S2T)
  images; on those, the previous target image's pixels of ``CLASSES_PER_MASK`` other classes where the teacher was
  confident (>= ``CONFIDENCE``): T2SS and T2ST; on those, ``PASTE_PER_IMAGE`` rare source objects each; then the
  strong augmentation, ``loss_quad_ss`` / ``loss_quad_st`` = ``LOSS_WEIGHT`` * CE_w. S2S and S2T are only
  backgrounds. The source loss, the feature distance and MIC stay.
* **The previous batch** (source images and labels, target images, pseudo-labels, confidence gate, pseudo-label
  weights) lives in :class:`BatchCache`, persistent buffers of this module, so a checkpoint holds it and
  ``--resume`` continues exactly. It is written after the losses of every step from ``START_ITER - 1`` on. A
  phase-B step that finds it empty (a run started or resumed at or after ``START_ITER`` from weights without it)
  or holding batches of other sizes fills it and is a phase-A step.

What is implemented is what the released image code does. The paper's abstract speaks of intra- and inter-domain
mixing "within an explicit feature space"; ``ok/dacs_*.py`` and its segmentors mix images and labels only (the
features of the mixed images are learned through the ordinary segmentation loss), and no feature-level mixing or
feature consistency term exists in the released code, so none is added here.

Deviations from the reference, by the audit's items (docs/release-audit/guidance-training-quadmix.md §2); the paper
configs set every switch below to the release (``UDA.RELEASE_FIDELITY fixed`` turns all of them to our side):

* Q1 (reproducible: ``UDA.QUADMIX.PASTE_NORMALIZATION as_released``): ``rand_mixer`` hands the network the pasted
  object in BGR order minus the RGB-order means, / 255 (``ok/dacs_gta.py:225-228``): faint, channel-swapped objects,
  which the colour jitter then denormalises with the model's mean and std as the rest of the image (reproduced: the
  object values sit inside (0, 1) after that denormalisation, so the jitter's clamp never acts). Default ``model``:
  normalised as every image.
* Q2 (reproducible: ``UDA.QUADMIX.RESET_TEACHER``, ``RESET_TEACHER_ITER``): the authors resume a MIC checkpoint and
  hard-code the iteration (4000 ViT-GTA, 3000 ViT-SYNTHIA, 6000 CNN), where ``_init_ema_weights`` copies the
  student's parameters into the teacher (``:259, 511-515``); the switch does that at the same iteration of a run that
  trains MIC from iteration 0 (:meth:`QuadMix.update_teacher`), and the next alpha is the release's. Not reproduced:
  their README's "start from iteration 0" with ``local_iter`` still hard-coded (QuadMix would start 2000 to 6000
  iterations early), a path they did not run. Default: the teacher carries on.
* Q3 (reproducible: ``UDA.QUADMIX.REFERENCE_QUIRKS``, docs/methods.md §4.7): the ignore label can be a source-mask
  class; the target mask excludes the source mask's *positions* in ``unique(y_s')``; pasted objects keep the weight
  beneath them. Default: all three fixed.
* Q4 (reproducible: ``UDA.QUADMIX.RARE_OBJECTS_AS_RELEASED``, ``RARE_RESIZE``): rare objects come from the data
  loader (``batch["source_paste"]``, :func:`~uda_plugins.data.build.build_source_paste_stream`), not from disk reads
  in the step. As released: ``random.sample(RARE_CLASSES, PASTE_PER_IMAGE)`` per iteration, shared by every quad
  image; each object from an image holding its class drawn uniformly, stretched to 2048x1024, a random 1024 crop, no
  flip, a new image until the crop holds > ``RARE_MIN_PIXELS`` (:class:`~uda_plugins.data.samplers.
  SharedClassObjectSampler`). What no switch can settle: the release draws from ``data/*_ids2path.json``, whose
  inclusion rule is unknown (the GTA5 file is not in the repository); the switch draws from every image with a pixel
  of the class that could give a passing crop, which is the release's draw if the file lists every image holding
  the class. Default: each object draws its class (P(c) by multiplicity in the list, the same marginal), passes the
  source pipeline (GTA5 fitted to 2560x1440, flip 0.5, cat_max_ratio 0.75: objects about 1.25x wider and 1.37x
  taller, SYNTHIA 1.25x and 1.48x, half flipped) and re-draws its crop at most ``DATALOADER.RCS.CROP_REDRAWS`` times
  on the same image.
* Q5 (kept): any batch size (the reference indexes images 0 and 1): one quad image per target image, source images
  paired ``i mod N_s`` as in DACS; identical at 2 + 2; with N_t > N_s the quad images sharing a source share its mask.
* Q6 (kept): a previous source label with fewer than ``CLASSES_PER_MASK`` classes gives fewer (the reference's
  ``np.random.choice(n, 2)`` raises).
* Q7 (reproducible: ``UDA.MIX.CLASSES_FROM_BATCH``): phase A's ClassMix draws from the whole source batch in the
  release.
* Q8 (kept): the previous batch is checkpointed (the reference's plain attributes are not, and a resume in phase B
  would fail on its 640-px templates); see :class:`BatchCache` and the per-rank note below.
* Q9 (as released): the DeepLab-V2 configs use the authors' seed 0, the MiT-B5 ones seed 1.
* Q10 (documented in configs/README.md): the reference evaluates and keeps a checkpoint every 500 iterations, so its
  numbers may be the best of 80 on val; the configs evaluate every 4000 (``TEST.EVAL_PERIOD 500`` to match).
* Q11 (open, outside this package): docs/methods.md §4.7 omits Q1 and the weight 1 beneath some pasted objects.
* Q12 (nothing to reproduce): the release writes debug PNGs at iterations 11000-11019 and fails without their folder.
* One strong-augmentation draw for both quad batches (on/off shared, factors per image), as the reference's
  per-iteration ``strong_parameters``; losses summed and back-propagated once (the same gradients as its separate
  backward calls).
* Guidance Training is not combined with QuadMix (it reconstructs ClassMix, which phase B does not have).
* Per rank, each process mixes its own previous batch. With several processes the checkpoint holds rank 0's cache
  (checkpoints are written by rank 0): after a resume in phase B every rank mixes rank 0's previous batch once.
  Exact resumption in phase B holds for one process (or with gradient accumulation instead of processes).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from uda_plugins.d2 import META_ARCH_REGISTRY, CfgNode, get_event_storage
from uda_plugins.data.build import DataRequirements
from uda_plugins.modeling import stack_images
from uda_plugins.utils.profiling import timed

from .dacs import DACS
from .quad_mix_masks import (
    Labelled,
    paste_objects,
    quad_mix,
    released_paste_normalization,
    source_quad_masks,
    target_quad_masks,
)
from .self_training import SelfTrainingStep
from .teacher import copy_parameter_values_

__all__ = ["QuadMix", "BatchCache"]

logger = logging.getLogger(__name__)

# What the next step needs of this one (the source pixel weight is always 1, so it is not kept).
_CACHE_FIELDS = ("source_images", "source_labels", "target_images", "pseudo_labels", "confident", "pseudo_weight")
# The quad images trained on per target image, in the order of the rare-object stream: T2SS, T2ST.
_QUAD_IMAGES = ("ss", "st")
PASTE_NORMALIZATIONS = ("model", "as_released")


class BatchCache(nn.Module):
    """A batch kept from one step to the next in persistent buffers, so it is saved and restored with the model.

    Each field holds ``slots`` batches stacked along dim 0: slot ``m`` is micro-batch ``m`` of a step with gradient
    accumulation, which mixes with micro-batch ``m`` of the previous step (as process ``m`` would without
    accumulation). The buffers are empty until the first write; an empty field is left out of the state dict,
    because Detectron2/fvcore's checkpointer drops checkpoint tensors whose shape differs from the model's before
    loading, and before a batch is seen the cache has no shape. Loading resizes the buffers to the checkpoint's
    tensors; a checkpoint without them (written before the cache was filled, by another method, or dropped for a
    shape mismatch) empties the cache.
    """

    def __init__(self, fields: Sequence[str], slots: int = 1) -> None:
        super().__init__()
        if slots < 1:
            raise ValueError(f"A batch cache needs at least one slot, not {slots}")
        self.fields = tuple(fields)
        self.slots = int(slots)
        for name in self.fields:
            self.register_buffer(name, torch.empty(0), persistent=True)
        self._register_state_dict_hook(BatchCache._drop_empty_fields)

    @staticmethod
    def _drop_empty_fields(module: "BatchCache", state_dict: dict, prefix: str, local_metadata) -> None:
        for name in module.fields:
            if module._buffers[name].numel() == 0:
                state_dict.pop(prefix + name, None)

    def is_empty(self) -> bool:
        return any(self._buffers[name].numel() == 0 for name in self.fields)

    def clear(self) -> None:
        for name in self.fields:
            self._buffers[name] = self._buffers[name].new_empty(0)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise IndexError(f"Batch cache slot {slot} of {self.slots} (more micro-batches than configured?)")

    def read(self, slot: int = 0) -> Optional[Dict[str, torch.Tensor]]:
        """The batch of ``slot``, or None when the cache is empty."""
        self._check_slot(slot)
        if self.is_empty():
            return None
        out = {}
        for name in self.fields:
            rows = self._buffers[name].shape[0] // self.slots
            out[name] = self._buffers[name][slot * rows : (slot + 1) * rows]
        return out

    def write(self, slot: int = 0, **tensors: torch.Tensor) -> None:
        """Keep detached copies of ``tensors`` (one per field) in ``slot``. The buffers are replaced, not written in
        place, so tensors read from the cache earlier in the step stay valid."""
        self._check_slot(slot)
        if set(tensors) != set(self.fields):
            raise KeyError(f"A batch cache write needs exactly the fields {self.fields}, got {sorted(tensors)}")
        for name, value in tensors.items():
            value = value.detach()
            old = self._buffers[name]
            fits = (
                old.shape == (self.slots * value.shape[0],) + value.shape[1:]
                and old.dtype == value.dtype
                and old.device == value.device
            )
            # Other slots keep their batches when the shape still fits; otherwise they start from zeros (all slots
            # are written in the same step, so no zero slot is ever read).
            parts = list(old.chunk(self.slots)) if fits else [torch.zeros_like(value)] * self.slots
            parts[slot] = value
            self._buffers[name] = torch.cat(parts)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        absent = []
        for name in self.fields:
            key = prefix + name
            if key in state_dict:
                # The copy into the buffer below needs the checkpoint's shape and dtype.
                self._buffers[name] = torch.empty_like(state_dict[key], device=self._buffers[name].device)
            else:
                self._buffers[name] = self._buffers[name].new_empty(0)
                absent.append(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # An absent field is an empty cache, not a missing buffer.
        missing_keys[:] = [key for key in missing_keys if key not in absent]


@META_ARCH_REGISTRY.register()
class QuadMix(DACS):
    data_requirements = DataRequirements(
        source=True, source_labels=True, target=True, target_labels=False, source_paste=True
    )

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__(cfg)
        if self.guidance is not None:
            raise ValueError(
                "Guidance Training reconstructs ClassMix, which QuadMix replaces: set UDA.GUIDANCE.LAMBDA 0"
            )
        quad = cfg.UDA.QUADMIX
        if quad.CLASSES_PER_MASK < 1:
            raise ValueError(f"UDA.QUADMIX.CLASSES_PER_MASK must be >= 1, not {quad.CLASSES_PER_MASK}")
        if not 0.0 <= quad.CONFIDENCE <= 1.0:
            raise ValueError(f"UDA.QUADMIX.CONFIDENCE is a probability, not {quad.CONFIDENCE}")
        if quad.PASTE_PER_IMAGE < 0:
            raise ValueError(f"UDA.QUADMIX.PASTE_PER_IMAGE must be >= 0, not {quad.PASTE_PER_IMAGE}")
        self.start_iter = quad.START_ITER
        self.classes_per_mask = quad.CLASSES_PER_MASK
        self.confidence = quad.CONFIDENCE
        self.loss_weight = quad.LOSS_WEIGHT
        self.paste_per_image = quad.PASTE_PER_IMAGE
        self.reference_quirks = quad.REFERENCE_QUIRKS
        if quad.PASTE_NORMALIZATION not in PASTE_NORMALIZATIONS:
            raise ValueError(
                f"UDA.QUADMIX.PASTE_NORMALIZATION must be one of {PASTE_NORMALIZATIONS}, "
                f"not '{quad.PASTE_NORMALIZATION}'"
            )
        self.paste_normalization = quad.PASTE_NORMALIZATION
        if quad.RESET_TEACHER and quad.RESET_TEACHER_ITER < 0:
            raise ValueError(f"UDA.QUADMIX.RESET_TEACHER_ITER must be >= 0, not {quad.RESET_TEACHER_ITER}")
        self.reset_teacher_iter = quad.RESET_TEACHER_ITER if quad.RESET_TEACHER else None
        self.previous = BatchCache(_CACHE_FIELDS, slots=cfg.SOLVER.GRAD_ACCUMULATION_STEPS)
        self._slot = 0  # this forward's micro-batch in the step

    # ----------------------------------------------------------------------------------------------- step
    def forward_train(self, batch: Dict[str, list]) -> Dict[str, torch.Tensor]:
        self._slot = 0 if self.first_micro_batch else self._slot + 1
        return super().forward_train(batch)

    def mix_losses(self, step: SelfTrainingStep, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Phase A: DACS's ClassMix. Phase B: ``loss_quad_ss`` and ``loss_quad_st``; MIC keeps the plain
        pseudo-label weights."""
        iteration = get_event_storage().iter
        if iteration < self.start_iter:
            return super().mix_losses(step, losses)
        previous = self.previous.read(self._slot)
        if previous is None:
            logger.info(f"QuadMix: no previous batch cached at iteration {iteration}; this step mixes as DACS")
            return super().mix_losses(step, losses)
        if not self._matches(previous, step):
            logger.warning(
                f"QuadMix: the cached previous batch (from a checkpoint?) does not match the batch of iteration "
                f"{iteration} in size; this step mixes as DACS"
            )
            return super().mix_losses(step, losses)
        self.quad_losses(step, previous, losses)
        return step.pseudo_weight

    def end_step(self, step: SelfTrainingStep) -> None:
        """Keep this batch for the next step, from the step before phase B on."""
        if get_event_storage().iter >= self.start_iter - 1:
            self.previous.write(
                self._slot,
                source_images=step.source_images,
                source_labels=step.source_labels,
                target_images=step.target_images,
                pseudo_labels=step.pseudo_labels,
                confident=step.confidence >= self.confidence,
                pseudo_weight=step.pseudo_weight,
            )

    # ---------------------------------------------------------------------------------------------- teacher
    @torch.no_grad()
    def update_teacher(self) -> None:
        """The EMA update after each step; with ``UDA.QUADMIX.RESET_TEACHER``, after the step before
        ``RESET_TEACHER_ITER`` the teacher's parameters become the student's instead (counted as an update).

        The release (ZHE-SAPI/UDASS ``ok/dacs_gta.py:511-515``) runs, before the forward of iteration ``it``,
        ``_init_ema_weights()`` at ``it == local_iter`` (its hard-coded resume iteration, ``:259``) and
        ``_update_ema(it)`` after it, alpha = min(1 - 1/(it + 1), 0.999). Here the update after step ``t`` is the one
        the release makes before iteration ``t + 1``; its count is ``t + 1`` for a run from iteration 0, so the
        reset's next update has the release's alpha, and the reset itself depends only on the iteration and the
        checkpointed weights, so ``--resume`` across it is exact."""
        if self.reset_teacher_iter is not None and get_event_storage().iter == self.reset_teacher_iter - 1:
            self.count_teacher_update()
            copy_parameter_values_(self.teacher, self.student)
            logger.info(
                f"QuadMix: the teacher's parameters are the student's from iteration {self.reset_teacher_iter} on "
                "(UDA.QUADMIX.RESET_TEACHER)"
            )
            return
        super().update_teacher()

    # -------------------------------------------------------------------------------------------- phase B
    @staticmethod
    def _matches(previous: Dict[str, torch.Tensor], step: SelfTrainingStep) -> bool:
        return (
            previous["source_images"].shape == step.source_images.shape
            and previous["target_images"].shape == step.target_images.shape
        )

    def quad_losses(
        self, step: SelfTrainingStep, previous: Dict[str, torch.Tensor], losses: Dict[str, torch.Tensor]
    ) -> None:
        """``loss_quad_ss`` and ``loss_quad_st`` into ``losses`` (the reference's phase B, see the module doc)."""
        if step.source_images.shape[-2:] != step.target_images.shape[-2:]:
            raise ValueError(
                f"QuadMix mixes source and target images pixel by pixel: their training crops differ "
                f"({tuple(step.source_images.shape[-2:])} vs {tuple(step.target_images.shape[-2:])}); "
                "set INPUT.SOURCE.CROP_SIZE and INPUT.TARGET.CROP_SIZE alike"
            )
        n = step.target_images.shape[0]
        pair = torch.arange(n, device=step.source_images.device) % step.source_images.shape[0]
        with timed("mix_mask_augment"):
            source_masks, excluded = source_quad_masks(
                previous["source_labels"], self.classes_per_mask, self.ignore_value, self.reference_quirks
            )
            # Quad image i: previous source pair[i] over current source pair[i] / current target i, under previous
            # target i; its target mask excludes the classes of the source mask it lies on.
            target_masks = target_quad_masks(
                previous["pseudo_labels"],
                previous["confident"],
                [excluded[i] for i in pair.tolist()],
                self.classes_per_mask,
            )
            ones = torch.ones_like(step.pseudo_weight)
            mixes = quad_mix(
                source_masks[pair],
                target_masks,
                Labelled(previous["source_images"][pair], previous["source_labels"][pair], ones),
                Labelled(step.source_images[pair], step.source_labels[pair], ones),
                Labelled(previous["target_images"], previous["pseudo_labels"], previous["pseudo_weight"]),
                Labelled(step.target_images, step.pseudo_labels, step.pseudo_weight),
            )
            trained = {"ss": mixes.tss, "st": mixes.tst}
            if self.paste_per_image > 0:
                objects = self.rare_objects(step.batch, n, step.target_images.shape[-2:])
                for k, name in enumerate(_QUAD_IMAGES):
                    images, labels, classes = (t[:, k] for t in objects)
                    trained[name] = paste_objects(trained[name], images, labels, classes, self.reference_quirks)
            augmented = self.strong_aug(
                torch.cat([trained[name].image for name in _QUAD_IMAGES]), self.sample_strong_aug(2 * n)
            ).split(n)
        for name, image in zip(_QUAD_IMAGES, augmented):
            with timed("student_forward"):
                out = self.student.forward_train(image)
                losses[f"loss_quad_{name}"] = self.loss_weight * self.student.loss(
                    out, trained[name].label, trained[name].weight
                )
            if step.visualize:
                mixed = trained[name]
                self.visualize_panel(
                    f"quad/t2{name}_input_label_weight_pred", [image, mixed.label, mixed.weight, out.logits]
                )
        if step.visualize:
            self.visualize_panel(
                "quad/s2s_s2t_sourcemask_targetmask", [mixes.ss.image, mixes.st.image, source_masks[pair], target_masks]
            )

    def rare_objects(
        self, batch: Dict[str, list], n: int, size: Tuple[int, int]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loader's rare source objects as (n, 2, P, 3, H, W) images, (n, 2, P, H, W) labels and (n, 2, P)
        classes: P = ``PASTE_PER_IMAGE`` per quad image (T2SS, T2ST) per target image. The loader serves them in P
        blocks of 2n, block p holding object p of every quad image (``"paste_slot"``,
        :class:`~uda_plugins.data.build.SourcePasteStream`)."""
        dicts = batch.get("source_paste")
        per_slot = n * len(_QUAD_IMAGES)
        expected = per_slot * self.paste_per_image
        if not dicts or len(dicts) != expected:
            raise ValueError(
                f"QuadMix pastes {expected} rare source objects per step from batch['source_paste'], which holds "
                f"{len(dicts or [])}: train with the loader of QuadMix's data_requirements, or set "
                "UDA.QUADMIX.PASTE_PER_IMAGE 0"
            )
        slots = [d.get("paste_slot") for d in dicts]
        if slots != [p for p in range(self.paste_per_image) for _ in range(per_slot)]:
            raise ValueError(
                f"batch['source_paste'] must hold {self.paste_per_image} blocks of {per_slot} objects in the order of "
                f"their 'paste_slot' (the loader of QuadMix's data_requirements serves them so), not {slots}"
            )
        images, labels = self.paste_images(dicts), torch.stack([d["sem_seg"] for d in dicts]).to(self.device)
        if tuple(images.shape[-2:]) != tuple(size):
            raise ValueError(
                f"The rare source objects are {tuple(images.shape[-2:])} crops, the quad images {tuple(size)}: "
                "set INPUT.SOURCE.CROP_SIZE and INPUT.TARGET.CROP_SIZE alike (drawn as released without a crop, the "
                "objects are UDA.QUADMIX.RARE_RESIZE)"
            )
        classes = torch.tensor([d["rcs_class"] for d in dicts], device=labels.device)
        shape = (self.paste_per_image, n, len(_QUAD_IMAGES))

        def per_quad_image(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(*shape, *t.shape[1:]).movedim(0, 2)

        return per_quad_image(images), per_quad_image(labels), per_quad_image(classes)

    def paste_images(self, dicts: list) -> torch.Tensor:
        """The objects' images in the network's input space: normalised as every image (``PASTE_NORMALIZATION
        model``) or as the release's ``rand_mixer`` (``as_released``, :func:`released_paste_normalization`)."""
        rgb = stack_images(dicts, self.device)
        if self.paste_normalization == "model":
            return self.student.normalize(rgb)
        released = released_paste_normalization(rgb)
        # The release's network reads RGB; a BGR network gets each value in the channel of the same colour.
        return released.flip(1) if self.student.input_bgr else released
