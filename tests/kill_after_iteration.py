"""``python tests/kill_after_iteration.py N <train_net.py arguments>``: train, and SIGKILL this process right
after iteration N (after that iteration's hooks, checkpointer included) — a crash with no chance to clean up."""

import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import train_net  # noqa: E402

from uda_plugins.d2 import HookBase  # noqa: E402
from uda_plugins.engine.trainer import UDATrainer  # noqa: E402


class _KillAfter(HookBase):
    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def after_step(self) -> None:
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    iteration = int(sys.argv[1])
    build_hooks = UDATrainer.build_hooks
    UDATrainer.build_hooks = lambda self: build_hooks(self) + [_KillAfter(iteration)]
    return train_net.cli(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
