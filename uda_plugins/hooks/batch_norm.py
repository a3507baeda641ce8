"""Re-estimates the teacher's BatchNorm statistics before each evaluation (DUDA's ``mean_update_bn``)."""

from __future__ import annotations

from uda_plugins.d2 import CfgNode, HookBase

__all__ = ["TeacherBatchNormHook"]


class TeacherBatchNormHook(HookBase):
    """Calls ``model.recalibrate_teacher_bn(cfg)`` after the steps an evaluation follows (every
    ``TEST.EVAL_PERIOD`` and the last), once self-training has started. It runs in ``after_step`` before the
    checkpointer, so the checkpoint holds the statistics that were evaluated and ``--eval-only`` on it gives the
    same numbers."""

    def __init__(self, model, cfg: CfgNode) -> None:
        self._model = model
        self._cfg = cfg
        self._period = cfg.TEST.EVAL_PERIOD

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        evaluates = next_iter == self.trainer.max_iter or (self._period > 0 and next_iter % self._period == 0)
        if evaluates and self._model.self_training_iteration(self.trainer.iter) >= 0:
            self._model.recalibrate_teacher_bn(self._cfg)
