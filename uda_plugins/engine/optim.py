"""Optimizers and learning-rate schedules of the UDA papers.

Parameter groups follow mmcv's ``paramwise_cfg`` as DAFormer/MIC use it: parameters whose name contains
"head" (or, for a model with ``is_head_parameter(name)``, those it names) get ``SOLVER.HEAD_LR_MULTIPLIER`` x the
learning rate; normalisation layers get
``SOLVER.WEIGHT_DECAY_NORM`` (Detectron2's key, 0 by default; with ``SOLVER.HEAD_NORMS_DECAYED``, as the releases'
mmcv custom-key precedence does, the heads' norm layers get ``SOLVER.WEIGHT_DECAY``) and names containing a
``SOLVER.NO_WEIGHT_DECAY_KEYWORDS`` entry get no decay. Frozen parameters (a teacher) are left out.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from fvcore.common.param_scheduler import (
    CosineParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)
from torch import nn

from uda_plugins.d2 import CfgNode, LRMultiplier, WarmupParamScheduler

__all__ = ["build_param_groups", "build_optimizer", "CompositeOptimizer", "PolyWithWarmup", "build_lr_scheduler"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def build_param_groups(cfg: CfgNode, model: nn.Module, excluded=frozenset()) -> List[dict]:
    """Groups of the trainable parameters of ``model`` except those whose ``id`` is in ``excluded``."""
    s = cfg.SOLVER
    groups: Dict[Tuple[float, float], List[nn.Parameter]] = {}
    seen = set(excluded)
    is_head = getattr(model, "is_head_parameter", lambda name: "head" in name)
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full_name = f"{module_name}.{name}" if module_name else name
            lr = s.BASE_LR * (s.HEAD_LR_MULTIPLIER if is_head(full_name) else 1.0)
            if isinstance(module, _NORM_TYPES) and not (s.HEAD_NORMS_DECAYED and is_head(full_name)):
                wd = s.WEIGHT_DECAY_NORM
            elif any(k in full_name for k in s.NO_WEIGHT_DECAY_KEYWORDS):
                wd = 0.0
            else:
                wd = s.WEIGHT_DECAY
            groups.setdefault((lr, wd), []).append(p)
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


class CompositeOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one (SGD for the segmenter beside Adam for discriminators, MCL's warm-up): one
    ``zero_grad``/``step``, one ``param_groups`` list (the optimizers' own group dicts, so a learning-rate scheduler
    and a GradScaler see every group), one state dict holding each optimizer's."""

    def __init__(self, optimizers) -> None:  # noqa: D107 (torch.optim.Optimizer.__init__ is not called on purpose)
        self.optimizers = list(optimizers)
        self.defaults = {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("CompositeOptimizer.step takes no closure")
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"The checkpoint has {len(states)} optimizers, this model {len(self.optimizers)}")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)

    def __repr__(self) -> str:
        return f"CompositeOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """The segmenter's optimizer (``SOLVER.OPTIMIZER`` over :func:`build_param_groups`). A meta-architecture with
    ``separate_optimizers(cfg)`` (a list of optimizers over some of its parameters, e.g. discriminators) gets a
    :class:`CompositeOptimizer` of both, those parameters left out of the first."""
    extras = list(getattr(model, "separate_optimizers", lambda c: [])(cfg))
    separate = {id(p) for o in extras for g in o.param_groups for p in g["params"]}
    main = _build_main_optimizer(cfg, model, separate)
    return CompositeOptimizer([main] + extras) if extras else main


# SOLVER.OPTIMIZER_IMPLEMENTATION -> the keyword arguments of torch's SGD / AdamW.
_IMPLEMENTATIONS = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _build_main_optimizer(cfg: CfgNode, model: nn.Module, excluded=frozenset()) -> torch.optim.Optimizer:
    s = cfg.SOLVER
    if s.CLIP_GRADIENTS.ENABLED:
        raise NotImplementedError("SOLVER.CLIP_GRADIENTS is not supported yet; set SOLVER.CLIP_GRADIENTS.ENABLED False")
    groups = build_param_groups(cfg, model, excluded)
    if not groups:
        raise ValueError("The model has no trainable parameters")
    name = s.OPTIMIZER.upper()
    kernels = _IMPLEMENTATIONS.get(s.OPTIMIZER_IMPLEMENTATION)
    if kernels is None:
        raise ValueError(
            f"Unknown SOLVER.OPTIMIZER_IMPLEMENTATION '{s.OPTIMIZER_IMPLEMENTATION}' ({', '.join(_IMPLEMENTATIONS)})"
        )
    if name == "SGD":
        return torch.optim.SGD(
            groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV, weight_decay=s.WEIGHT_DECAY, **kernels
        )
    if name == "ADAMW":
        return torch.optim.AdamW(groups, lr=s.BASE_LR, betas=tuple(s.BETAS), weight_decay=s.WEIGHT_DECAY, **kernels)
    raise ValueError(f"Unknown SOLVER.OPTIMIZER '{s.OPTIMIZER}' (SGD or ADAMW)")


class PolyWithWarmup(ParamScheduler):
    """mmcv's iteration-based poly schedule with its multiplicative linear warmup (DAFormer's ``poly10warm``):
    ``poly(t) = (1 - end) * (1 - t/T)^power + end``, times ``1 - (1 - t/W) * (1 - warmup_ratio)`` for t < W."""

    def __init__(self, max_iter: int, power: float, end_ratio: float, warmup_iters: int, warmup_ratio: float) -> None:
        self.max_iter, self.power, self.end_ratio = max_iter, power, end_ratio
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio

    def __call__(self, where: float) -> float:
        t = min(where * self.max_iter, self.max_iter)
        value = (1.0 - self.end_ratio) * (1.0 - t / self.max_iter) ** self.power + self.end_ratio
        if t < self.warmup_iters:
            value *= 1.0 - (1.0 - t / self.warmup_iters) * (1.0 - self.warmup_ratio)
        return value


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    s = cfg.SOLVER
    name = s.LR_SCHEDULER_NAME
    if name == "WarmupPolyLR":
        sched: ParamScheduler = PolyWithWarmup(
            s.MAX_ITER,
            s.POLY_LR_POWER,
            s.POLY_LR_END / s.BASE_LR if s.BASE_LR else 0.0,
            s.WARMUP_ITERS,
            s.WARMUP_FACTOR,
        )
    else:
        if name == "WarmupMultiStepLR":
            steps = [x for x in s.STEPS if x <= s.MAX_ITER]
            base = MultiStepParamScheduler(
                values=[s.GAMMA**k for k in range(len(steps) + 1)], milestones=steps, num_updates=s.MAX_ITER
            )
        elif name == "WarmupCosineLR":
            base = CosineParamScheduler(1, 0)
        else:
            raise ValueError(f"Unknown SOLVER.LR_SCHEDULER_NAME '{name}'")
        sched = WarmupParamScheduler(base, s.WARMUP_FACTOR, min(s.WARMUP_ITERS / s.MAX_ITER, 1.0), s.WARMUP_METHOD)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=s.MAX_ITER)
