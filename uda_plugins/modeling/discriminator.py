"""Output-level domain discriminators (ADVENT / MCL's warm-up) and the one-backward adversarial losses.

:class:`OutputDiscriminator` follows MCL's ``FCDiscriminator(inplanes=C)`` as docs/methods.md §3.3 describes it
(feifei-cv/MCL ``models/discriminator.py``): four 3x3 stride-2 convolutions 64-128-256-512 (ReLU, the last
LeakyReLU 0.2), then a 1x1 convolution to one logit per cell. It reads ADVENT's weighted self-information map
(:func:`self_information`).

The reference trains the segmenter and the discriminators with separate backward passes (discriminators frozen
for the generator term, inputs detached for the discriminator term). Here both are one loss and one backward
(DESIGN.md): :func:`generator_loss` runs the discriminator with *detached copies of its parameters*
(``torch.func.functional_call``), so the generator term's gradient reaches only the segmenter;
:func:`discriminator_loss` reads *detached* maps, so its gradient reaches only the discriminator. The sum's
gradients are exactly the reference's two backward passes'.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = ["OutputDiscriminator", "self_information", "generator_loss", "discriminator_loss"]

SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0


class OutputDiscriminator(nn.Module):
    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__()
        widths = [in_channels, width, width * 2, width * 4, width * 8]
        layers = []
        for k in range(4):
            layers.append(nn.Conv2d(widths[k], widths[k + 1], 3, stride=2, padding=1))
            layers.append(nn.LeakyReLU(0.2, inplace=True) if k == 3 else nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def self_information(probs: torch.Tensor) -> torch.Tensor:
    """ADVENT's weighted self-information map -p log2(p) / log2(C) per class (MCL's ``prob_2_entropy``); its sum over
    classes is the normalised entropy in [0, 1]."""
    return -probs * torch.log2(probs + 1e-30) / math.log2(probs.shape[1])


def _bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def generator_loss(discriminator: nn.Module, target_map: torch.Tensor) -> torch.Tensor:
    """BCE of the discriminator's verdict on target maps against the *source* label, through frozen (detached)
    discriminator weights: trains the segmenter to make target outputs look like source outputs."""
    frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
    frozen.update(dict(discriminator.named_buffers()))
    return _bce(functional_call(discriminator, frozen, (target_map,)), SOURCE_LABEL)


def discriminator_loss(discriminator: nn.Module, source_map: torch.Tensor, target_map: torch.Tensor) -> torch.Tensor:
    """BCE(source maps -> source) + BCE(target maps -> target) on detached maps: trains only the discriminator."""
    return _bce(discriminator(source_map.detach()), SOURCE_LABEL) + _bce(
        discriminator(target_map.detach()), TARGET_LABEL
    )
