"""Hooks that run between training steps: EMA teacher updates, offline pseudo-label banks, BatchNorm
re-estimation (and, with later methods, active-learning rounds)."""

from .batch_norm import TeacherBatchNormHook
from .ema import EMATeacherHook
from .pseudo_label_bank import PseudoLabelBankHook

__all__ = ["EMATeacherHook", "PseudoLabelBankHook", "TeacherBatchNormHook"]
