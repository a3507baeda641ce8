"""Normalisation layers by name, as Detectron2's ``get_norm``: "BN", "SyncBN", "FrozenBN", "GN", "" (none)."""

from __future__ import annotations

import math

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["get_norm", "freeze_batch_norm"]


def get_norm(name: str, channels: int) -> nn.Module:
    if name == "":
        return nn.Identity()
    if name == "BN":
        return nn.BatchNorm2d(channels)
    if name == "SyncBN":
        return nn.SyncBatchNorm(channels)
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
