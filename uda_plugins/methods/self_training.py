"""The mean-teacher self-training base shared by DACS and every method built on it (MIC, Guidance Training,
QuadMix, ...): an EMA teacher, its pseudo-labels with DACS's quality weight and DAFormer/HRDA's margin rules,
and the strong augmentation.

The teacher is a submodule (``requires_grad=False``), so it is saved with the model, evaluated on request
(``TEST.EVAL_MODEL teacher|both``) and never all-reduced by DDP. ``ema_updates`` counts the EMA updates; it is a
buffer, so ``--resume`` restores it with the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from uda_plugins.d2 import CfgNode
from uda_plugins.data.strong_aug import StrongAugParams, apply_strong_aug, sample_strong_aug
from uda_plugins.hooks import EMATeacherHook
from uda_plugins.utils.profiling import timed

from .base import UDAMetaArch
from .pseudo_labels import frame_margin_mask, ignore_crop_rows, pseudo_labels_from_logits
from .teacher import copy_parameters_, ema_alpha, ema_update_, make_teacher, set_stochastic_layers_eval

__all__ = ["SelfTrainingArch", "SelfTrainingStep"]


@dataclass
class SelfTrainingStep:
    """What one self-training step knows once the teacher has labelled the target batch; the pieces of a step
    (ClassMix, MIC, QuadMix, ...) read it. Images are normalised (N, 3, H, W), the rest (N, H, W)."""

    batch: Dict[str, list]  # the loader's batch: methods read the extra streams they asked for from it
    source_images: torch.Tensor
    source_labels: torch.Tensor
    target_images: torch.Tensor
    pseudo_labels: torch.Tensor
    pseudo_weight: torch.Tensor
    confidence: torch.Tensor  # the teacher's max softmax probability
    visualize: bool  # this step writes pictures to the event storage


class SelfTrainingArch(UDAMetaArch):
    def __init__(self, cfg: CfgNode) -> None:
        super().__init__(cfg)
        self.teacher = make_teacher(self.student)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._host_ema_updates = None  # a host copy of ema_updates (see update_teacher)
        self._register_load_state_dict_pre_hook(self._forget_host_ema_updates)
        self.ema_alpha = cfg.UDA.TEACHER.ALPHA
        pl = cfg.UDA.PSEUDO_LABEL
        self.pseudo_threshold = pl.THRESHOLD
        self.ignore_top, self.ignore_bottom = pl.IGNORE_TOP, pl.IGNORE_BOTTOM
        self.frame_margins = tuple(pl.FRAME_MARGINS)
        if any(self.frame_margins) and (self.ignore_top or self.ignore_bottom):
            raise ValueError(
                "UDA.PSEUDO_LABEL.FRAME_MARGINS and IGNORE_TOP/IGNORE_BOTTOM are two variants of one rule; set one"
            )
        aug = cfg.UDA.STRONG_AUG
        self.aug_strength, self.aug_skip_prob, self.aug_blur = (
            aug.COLOR_JITTER_STRENGTH,
            aug.COLOR_JITTER_SKIP_PROB,
            aug.BLUR,
        )

    # ------------------------------------------------------------------------------------------ teacher
    def evaluable_models(self) -> Dict[str, torch.nn.Module]:
        return {"student": self.student, "teacher": self.teacher}

    def training_hooks(self, cfg: CfgNode) -> List:
        return [EMATeacherHook(self)]

    def train(self, mode: bool = True) -> "SelfTrainingArch":
        super().train(mode)
        set_stochastic_layers_eval(self.teacher)
        return self

    def init_teacher(self) -> None:
        """teacher := student before the first update (e.g. after MODEL.WEIGHTS loaded a student); a teacher that
        has been updated (a resumed run) is kept."""
        if int(self.ema_updates) == 0:
            copy_parameters_(self.teacher, self.student)

    @torch.no_grad()
    def update_teacher(self) -> None:
        ema_update_(self.teacher, self.student, ema_alpha(self.count_teacher_update(), self.ema_alpha))

    def count_teacher_update(self) -> int:
        """Count one more teacher update and return the count (1-based), which sets the EMA factor."""
        # The EMA factor needs the count on the host: read the buffer once (after construction or a load), then
        # count on the host too, so a step on the GPU does not wait for a device->host copy.
        if self._host_ema_updates is None:
            self._host_ema_updates = int(self.ema_updates)
        self._host_ema_updates += 1
        self.ema_updates += 1
        return self._host_ema_updates

    def _forget_host_ema_updates(self, *args, **kwargs) -> None:
        self._host_ema_updates = None  # the buffer is being loaded: re-read it at the next update

    # ------------------------------------------------------------------------------------ pseudo-labels
    @torch.no_grad()
    def pseudo_labels(
        self, images: torch.Tensor, dicts: List[dict]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher predictions on normalised target ``images`` -> (labels, pixel weights, confidence, logits),
        all (N, H, W) at the image resolution except the logits (N, C, H, W). The weights are the batch quality
        weight with the crop-row or frame-margin rule applied."""
        with timed("teacher_forward"):
            logits = self.teacher.predict(images)
        with timed("pseudo_labels"):
            labels, confidence, weight = pseudo_labels_from_logits(logits, self.pseudo_threshold)
            ignore_crop_rows(weight, self.ignore_top, self.ignore_bottom)
            if any(self.frame_margins):
                weight = weight * frame_margin_mask([d["geometry"] for d in dicts], self.frame_margins, weight.device)
        return labels, weight, confidence, logits

    # ------------------------------------------------------------------------------------- augmentation
    def sample_strong_aug(self, n: int, per_image: bool = True, blur: Optional[bool] = None) -> StrongAugParams:
        """A draw for ``n`` images (``per_image``: see :mod:`uda_plugins.data.strong_aug`); ``blur`` overrides
        ``UDA.STRONG_AUG.BLUR``."""
        blur = self.aug_blur if blur is None else blur
        return sample_strong_aug(n, self.aug_strength, self.aug_skip_prob, blur, per_image=per_image)

    def strong_aug(self, images: torch.Tensor, params: StrongAugParams) -> torch.Tensor:
        student = self.student
        return apply_strong_aug(images, params, student.pixel_mean, student.pixel_std, bgr=student.input_bgr)
