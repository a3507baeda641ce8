"""Hooks that run between training steps: EMA teacher updates, offline pseudo-label banks, BatchNorm
re-estimation, active-learning rounds."""

from .active_learning import ActiveLearningHook
from .batch_norm import TeacherBatchNormHook
from .ema import EMATeacherHook
from .pseudo_label_bank import PseudoLabelBankHook

__all__ = ["ActiveLearningHook", "EMATeacherHook", "PseudoLabelBankHook", "TeacherBatchNormHook"]
