"""The per-iteration step of every method: one forward of the meta-architecture, one backward, one optimizer
step — Detectron2's SimpleTrainer, plus a finiteness check on every rank *before* the step, so a NaN never
reaches the weights and the error names the offending losses."""

from __future__ import annotations

import time
from typing import Dict

import torch
import torch.distributed as dist

from uda_plugins.d2 import SimpleTrainer, comm

__all__ = ["UDAStepRunner", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the weights were not updated with it."""


class UDAStepRunner(SimpleTrainer):
    def run_step(self) -> None:
        assert self.model.training, "[UDAStepRunner] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        loss_dict: Dict[str, torch.Tensor] = self.model(data)
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=True)
        losses.backward()
        self.after_backward()
        self.check_finite(loss_dict)
        self._write_metrics(loss_dict, data_time)
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
