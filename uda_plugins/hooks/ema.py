"""Updates the meta-architecture's EMA teacher after every optimizer step."""

from __future__ import annotations

from uda_plugins.d2 import HookBase
from uda_plugins.utils.profiling import timed

__all__ = ["EMATeacherHook"]


class EMATeacherHook(HookBase):
    """Calls ``model.update_teacher()`` after each step (``before_train``: ``model.init_teacher()``, which copies
    the student only when no update has happened yet, so a resumed run keeps its teacher).

    Placed before the checkpointer (``UDATrainer.build_hooks`` puts a method's hooks there), so a checkpoint of
    iteration ``t`` holds the teacher after ``t + 1`` updates, and the resumed iteration ``t + 1`` sees the same
    teacher as the uninterrupted run.
    """

    def __init__(self, model) -> None:
        self._model = model  # the unwrapped meta-architecture

    def before_train(self) -> None:
        self._model.init_teacher()

    def after_step(self) -> None:
        with timed("ema"):
            self._model.update_teacher()
