"""Hooks that run between training steps: EMA teacher updates (and, with later methods, pseudo-label bank
refreshes and active-learning rounds)."""

from .ema import EMATeacherHook

__all__ = ["EMATeacherHook"]
