"""The mean teacher: a frozen copy of the student updated by an exponential moving average of its parameters.

Follows lhoyer/MIC ``seg/mmseg/models/uda/dacs.py`` (``_init_ema_weights``, ``_update_ema``): the teacher starts as
a copy of the student, and after the k-th optimizer step (the reference: before iteration k's forward)
``teacher <- a_k * teacher + (1 - a_k) * student`` over ``parameters()`` only (BN buffers are the teacher's own),
``a_k = min(1 - 1 / (k + 1), alpha)``. The number of updates is a buffer of the meta-architecture, so it is
checkpointed with the teacher and ``--resume`` continues both (the reference re-initialises the teacher on
resume).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = [
    "make_teacher",
    "ema_alpha",
    "ema_update_",
    "copy_parameters_",
    "copy_parameter_values_",
    "set_stochastic_layers_eval",
]


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def ema_alpha(update: int, alpha: float) -> float:
    """The EMA factor of the ``update``-th update (1-based): ramps from 0.5 up to ``alpha``."""
    return min(1.0 - 1.0 / (update + 1), alpha)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    if len(t) != len(s):
        raise RuntimeError("Teacher and student have different parameter lists")
    torch._foreach_mul_(t, alpha)
    torch._foreach_add_(t, s, alpha=1.0 - alpha)


@torch.no_grad()
def copy_parameters_(teacher: nn.Module, student: nn.Module) -> None:
    """teacher := student (parameters and buffers)."""
    teacher.load_state_dict(student.state_dict())


@torch.no_grad()
def copy_parameter_values_(teacher: nn.Module, student: nn.Module) -> None:
    """The teacher's parameters := the student's; its buffers (BatchNorm statistics) stay its own. This is lhoyer/MIC
    ``_init_ema_weights`` (over ``parameters()`` only), which UDASS calls again at its hard-coded resume iteration
    (ZHE-SAPI/UDASS ``image_udass/seg/mmseg/models/uda/ok/dacs_gta.py:315-325, 511-512``)."""
    t = list(teacher.parameters())
    s = [p.detach() for p in student.parameters()]
    if len(t) != len(s):
        raise RuntimeError("Teacher and student have different parameter lists")
    for mine, theirs in zip(t, s):
        mine.copy_(theirs)


def set_stochastic_layers_eval(module: nn.Module) -> None:
    """Dropout and DropPath off (the reference sets them to eval before every teacher forward); BatchNorm keeps
    the module's mode, so in training the teacher normalises with target-batch statistics as the reference."""
    from timm.layers import DropPath

    for m in module.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, DropPath)):
            m.training = False
