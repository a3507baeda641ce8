"""The per-iteration step of every method: Detectron2's SimpleTrainer (one forward of the meta-architecture, one
backward, one optimizer step), plus:

* **seeded randomness**: torch's global RNG is seeded from (data seed, iteration, virtual rank) before each
  forward, so every random draw of a method (class choice, augmentation, masks, dropout) is a function of the
  iteration: a resumed run draws what the uninterrupted run drew, with no RNG state to checkpoint;
* **gradient accumulation** (``SOLVER.GRAD_ACCUMULATION_STEPS = K``): this rank's batch is split into K
  micro-batches, each forwarded and backwarded (DDP synchronises gradients only on the last) with its losses
  scaled by 1/K, then one optimizer step. Micro-batch ``m`` of rank ``r`` (of W) reads exactly the samples, and
  draws exactly the random numbers, of rank ``m * W + r`` in a run with K * W processes and no accumulation — so
  one small device reproduces a large global batch (up to the normalisation layers: use GroupNorm or frozen BN
  where BatchNorm statistics would differ). Batch-level statistics of a method (e.g. the pseudo-label quality
  weight) are computed per micro-batch, as they are per rank;
* **mixed precision** (``SOLVER.AMP``): the forward runs under ``torch.autocast`` in bf16 (CPU and GPU) or fp16
  (GPU, with a ``GradScaler`` whose state is checkpointed); methods keep softmax, pseudo-labels and losses in fp32;
* **non-finite losses**: a finiteness check on every rank *before* the optimizer step, so a NaN never reaches the
  weights and the error names the offending losses; ``SOLVER.MAX_SKIPPED_NONFINITE_STEPS`` lets a run skip that
  many such steps in total (weights untouched; the iteration still counts for the schedule and the teacher)
  before it stops.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from uda_plugins.d2 import SimpleTrainer, comm
from uda_plugins.utils.profiling import timed

__all__ = ["UDAStepRunner", "NonFiniteLossError", "step_seed", "split_batch", "amp_dtype"]

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def step_seed(seed: int, iteration: int, rank: int) -> int:
    """A well-mixed 63-bit seed for (seed, iteration, rank)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(iteration), int(rank)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1]))


def amp_dtype(enabled: bool, precision: str, device: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``SOLVER.AMP`` (None when off); fp16 needs CUDA (on the CPU it is slow and has no
    loss scaling)."""
    if not enabled:
        return None
    if precision not in _AMP_DTYPES:
        raise ValueError(f"SOLVER.AMP.PRECISION must be one of {sorted(_AMP_DTYPES)}, not '{precision}'")
    if precision == "float16" and not device.startswith("cuda"):
        raise ValueError("SOLVER.AMP.PRECISION float16 needs a CUDA device; use bfloat16 on the CPU")
    return _AMP_DTYPES[precision]


def split_batch(batch: Dict[str, list], parts: int) -> List[Dict[str, list]]:
    """Split a UDA batch (``{"source": [d, ...], "target": [[d, ...], ...]}``) into ``parts`` micro-batches;
    micro-batch ``m`` takes elements ``m, m + parts, ...`` of every list (see the module docstring for why)."""
    if parts == 1:
        return [batch]

    def take(items: list, m: int) -> list:
        if items and isinstance(items[0], list):
            return [take(inner, m) for inner in items]
        if len(items) % parts:
            raise ValueError(f"A batch of {len(items)} cannot be split into {parts} micro-batches")
        return items[m::parts]

    return [{key: take(value, m) for key, value in batch.items()} for m in range(parts)]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the weights were not updated with it."""


class UDAStepRunner(SimpleTrainer):
    def __init__(
        self,
        model: torch.nn.Module,
        data_loader,
        optimizer: torch.optim.Optimizer,
        *,
        accumulation_steps: int = 1,
        amp: Optional[torch.dtype] = None,
        max_skipped_nonfinite: int = 0,
    ) -> None:
        super().__init__(model, data_loader, optimizer)
        if accumulation_steps < 1:
            raise ValueError(f"SOLVER.GRAD_ACCUMULATION_STEPS must be >= 1, not {accumulation_steps}")
        self.accumulation_steps = accumulation_steps
        self.amp = amp
        self.grad_scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        self.max_skipped_nonfinite = max_skipped_nonfinite
        self.skipped_nonfinite = 0

    @property
    def _meta_arch(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device, dtype=self.amp)

    def run_step(self) -> None:
        assert self.model.training, "[UDAStepRunner] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        k = self.accumulation_steps
        world, rank = comm.get_world_size(), comm.get_rank()
        self.optimizer.zero_grad(set_to_none=True)
        loss_dict: Dict[str, torch.Tensor] = {}
        for m, micro_batch in enumerate(split_batch(data, k)):
            torch.manual_seed(step_seed(getattr(self.data_loader, "seed", 0), self.iter, m * world + rank))
            # Pictures of one micro-batch per step; gradients synchronised once, on the last micro-batch.
            self._meta_arch.first_micro_batch = m == 0
            sync = m == k - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self._autocast():
                    micro_losses = self.model(micro_batch)
                losses = sum(micro_losses.values()) / k
                with timed("backward"):
                    (self.grad_scaler.scale(losses) if self.grad_scaler else losses).backward()
            for name, value in micro_losses.items():
                loss_dict[name] = loss_dict.get(name, 0) + value.detach().float() / k
        self.after_backward()
        if not self.losses_finite(loss_dict):
            return
        self._write_metrics(loss_dict, data_time)
        with timed("optimizer"):
            if self.grad_scaler is not None:
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            else:
                self.optimizer.step()

    def losses_finite(self, loss_dict: Dict[str, torch.Tensor]) -> bool:
        """True when every loss on every rank is finite (one host sync). Otherwise the step is skipped (False)
        while the skip budget lasts, then :class:`NonFiniteLossError` is raised on every rank."""
        values = torch.stack([v.detach().float() for v in loss_dict.values()])
        finite = torch.isfinite(values)
        all_finite = finite.all()
        if comm.get_world_size() > 1:
            flag = all_finite.to(torch.int32).cpu()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=None)
            all_finite = flag.bool()
        if bool(all_finite):
            return True
        bad = {k: float(v) for (k, v), ok in zip(loss_dict.items(), finite.tolist()) if not ok}
        where = ", ".join(f"{k}={v}" for k, v in bad.items()) or "on another rank"
        message = f"Non-finite loss at iteration {self.iter}: {where}"
        if self.skipped_nonfinite < self.max_skipped_nonfinite:
            self.skipped_nonfinite += 1
            logger.warning(
                f"{message}; step skipped ({self.skipped_nonfinite} of at most {self.max_skipped_nonfinite})"
            )
            self.optimizer.zero_grad(set_to_none=True)
            return False
        raise NonFiniteLossError(message)

    def state_dict(self) -> dict:
        ret = super().state_dict()
        ret["skipped_nonfinite"] = self.skipped_nonfinite
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
