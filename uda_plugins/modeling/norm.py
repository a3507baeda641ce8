"""Normalisation layers by name, as Detectron2's ``get_norm``: "BN", "SyncBN", "FrozenBN", "GN", "" (none)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["SyncBatchNorm2d", "get_norm", "freeze_batch_norm"]


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the whole batch over every process: torch's
    ``SyncBatchNorm`` semantics (count-weighted mean and variance, the running variance unbiased over the global
    count, gradients through the global statistics), on the CPU with gloo as on GPUs, which torch's own refuses
    (Detectron2's ``NaiveSyncBatchNorm`` does the same with a differentiable all-reduce). With one process, or in
    eval mode, it is ``BatchNorm2d``. Every process must call it the same number of times per step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable: the backward all-reduces too

        channels = x.shape[1]
        xf = x.float()  # half precision is not enough for the sums
        count = xf.new_full((1,), xf.numel() // channels)
        stats = all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * var * total / (total - 1).clamp(min=1))
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return (xf * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)


def get_norm(name: str, channels: int) -> nn.Module:
    if name == "":
        return nn.Identity()
    if name == "BN":
        return nn.BatchNorm2d(channels)
    if name == "SyncBN":
        return SyncBatchNorm2d(channels)
    if name == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if name == "GN":
        # 32 groups where the width allows it (Detectron2's rule), else the largest divisor of the width below 32.
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"Unknown norm '{name}'; use one of BN, SyncBN, FrozenBN, GN or ''")


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a FrozenBatchNorm2d with the same statistics and affine."""
    from timm.layers import freeze_batch_norm_2d

    return freeze_batch_norm_2d(module)
