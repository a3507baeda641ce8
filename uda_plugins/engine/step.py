"""The per-iteration step of every method: one forward of the meta-architecture, one backward, one optimizer
step — Detectron2's SimpleTrainer, plus:

* torch's global RNG is seeded from (data seed, iteration, rank) before the forward, so every random draw of a
  method (class choice, augmentation, masks, dropout) is a function of the iteration: a resumed run draws what
  the uninterrupted run drew, with no RNG state to checkpoint;
* a finiteness check on every rank *before* the optimizer step, so a NaN never reaches the weights and the
  error names the offending losses."""

from __future__ import annotations

import time
from typing import Dict

import numpy as np
import torch
import torch.distributed as dist

from uda_plugins.d2 import SimpleTrainer, comm
from uda_plugins.utils.profiling import timed

__all__ = ["UDAStepRunner", "NonFiniteLossError", "step_seed"]


def step_seed(seed: int, iteration: int, rank: int) -> int:
    """A well-mixed 63-bit seed for (seed, iteration, rank)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(iteration), int(rank)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1]))


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the weights were not updated with it."""


class UDAStepRunner(SimpleTrainer):
    def run_step(self) -> None:
        assert self.model.training, "[UDAStepRunner] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        torch.manual_seed(step_seed(getattr(self.data_loader, "seed", 0), self.iter, comm.get_rank()))
        loss_dict: Dict[str, torch.Tensor] = self.model(data)
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=True)
        with timed("backward"):
            losses.backward()
        self.after_backward()
        self.check_finite(loss_dict)
        self._write_metrics(loss_dict, data_time)
        with timed("optimizer"):
            self.optimizer.step()

    def check_finite(self, loss_dict: Dict[str, torch.Tensor]) -> None:
        """Raise NonFiniteLossError on every rank if any rank has a non-finite loss (one host sync)."""
        values = torch.stack([v.detach().float() for v in loss_dict.values()])
        finite = torch.isfinite(values)
        all_finite = finite.all()
        if comm.get_world_size() > 1:
            flag = all_finite.to(torch.int32).cpu()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=None)
            all_finite = flag.bool()
        if not bool(all_finite):
            bad = {k: float(v) for (k, v), ok in zip(loss_dict.items(), finite.tolist()) if not ok}
            where = ", ".join(f"{k}={v}" for k, v in bad.items()) or "on another rank"
            raise NonFiniteLossError(f"Non-finite loss at iteration {self.iter}: {where}")
