"""Guidance Training (Zhou et al., arXiv 2403.14995) as a switch on the DACS family (``UDA.GUIDANCE.LAMBDA`` > 0).

Follows ``Wenlve-Zhou/Guidance-Training`` ``seg/mmseg/models/uda/dacs.py`` and
``segmentors/{encoder_decoder,hrda_encoder_decoder}.py`` (``guidance_training``): on the features of the student's
forward of the mixed image (no second encoder pass), for each view of that forward (one; with HRDA the context view
and the detail view with the same detail crop box), the :class:`~uda_plugins.modeling.guider.Guider` replaces the
positions pasted from the source and reconstructs them from the target context; the **shared** decode head decodes
the result, and its loss is against the teacher's pseudo-label of the original, unmixed target image:

    L_guid = LAMBDA * CE_w(head(Guider(features(x_mix), m)), pseudo_labels, q * mean_views(1 - exp(-EXPONENT * r)))

``m`` = 1 - ClassMix mask (1 = still target), ``r`` its per-image fraction of ones in each view (nearest-resized
to the view's scale and, for the detail view, cropped to its box), ``q`` the pseudo-label weights (quality weight
with the margin rules). With HRDA the loss is HRDA's (fused + detail), like the mixed loss.

A switch rather than a meta-architecture, so it composes with everything the DACS family does (MIC, HRDA, RCS, FD,
pseudo-label margins) and with the methods built on it. The Guider is a module of the meta-architecture, not of
the student: the teacher (a copy of the student) has none (the reference's teacher carries an unused one), and the
evaluated or exported student has no Guider parameters and the same inference cost.

The reference's in-place aliasing (``calibrated_pseudo_weight`` scales the pseudo-weight tensor in place) is fixed
by default. ``UDA.GUIDANCE.REFERENCE_WEIGHT_ALIASING`` reproduces it: the detail view's factor multiplies the already
scaled weight, so ``w = q * (f_ctx + f_ctx * f_det) / 2`` (one view: ``q * f``), and the MIC loss that follows gets
``q * f_ctx * f_det`` (one view: ``q * f``) instead of ``q``.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from uda_plugins.d2 import CfgNode
from uda_plugins.modeling.guider import Guider
from uda_plugins.modeling.hrda import crop
from uda_plugins.modeling.segmentor import Segmentor, SegmentorOutput, View

__all__ = ["GuidanceTraining", "guidance_factor", "view_target_fraction"]


def guidance_factor(target_fraction: torch.Tensor, exponent: float) -> torch.Tensor:
    """The per-image weight ``1 - exp(-exponent * r)`` (``calibrated_pseudo_weight``): small when little of the
    image is left to reconstruct from."""
    return 1.0 - torch.exp(-exponent * target_fraction)


def view_mask(target_mask: torch.Tensor, view: View) -> torch.Tensor:
    """(N, 1, H, W) target mask at the input resolution -> the mask of ``view`` (nearest-resized to its scale,
    cropped to its box)."""
    m = target_mask
    if view.scale != 1.0:
        m = F.interpolate(m, scale_factor=view.scale, mode="nearest")
    return crop(m, view.box) if view.box is not None else m


def view_target_fraction(target_mask: torch.Tensor, view: View) -> torch.Tensor:
    """(N,) fraction of target pixels in ``view``."""
    return view_mask(target_mask, view).flatten(1).mean(1)


class GuidanceTraining(nn.Module):
    def __init__(self, cfg: CfgNode, student: Segmentor) -> None:
        super().__init__()
        g = cfg.UDA.GUIDANCE
        self.loss_weight = float(g.LAMBDA)
        self.exponent = float(g.EXPONENT)
        self.reference_aliasing = bool(g.REFERENCE_WEIGHT_ALIASING)
        shapes = student.backbone.output_shape()
        levels = student.decoder_levels
        guided = g.FEATURE or levels[-1]
        if guided not in levels:
            raise ValueError(f"UDA.GUIDANCE.FEATURE '{guided}' is not a level the decode head reads: {levels}")
        self.guider = Guider(
            {k: shapes[k].channels for k in levels},
            guided,
            embed_dim=g.EMBED_DIM,
            depth=g.DEPTH,
            num_heads=g.NUM_HEADS,
            mlp_ratio=g.MLP_RATIO,
            patch_size=g.PATCH_SIZE,
        )

    def weights(
        self, target_mask: torch.Tensor, views: List[View], pseudo_weight: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(guidance pixel weights, the pseudo-label weights the MIC loss then uses)."""
        factors = [guidance_factor(view_target_fraction(target_mask, v), self.exponent) for v in views]
        if not self.reference_aliasing:
            return pseudo_weight * torch.stack(factors).mean(0)[:, None, None], pseudo_weight
        scaled, cumulative = [], torch.ones_like(factors[0])
        for f in factors:  # each view scales the tensor the previous one already scaled
            cumulative = cumulative * f
            scaled.append(cumulative)
        return pseudo_weight * torch.stack(scaled).mean(0)[:, None, None], pseudo_weight * cumulative[:, None, None]

    def forward(
        self,
        student: Segmentor,
        mix_output: SegmentorOutput,
        mix_masks: torch.Tensor,
        pseudo_labels: torch.Tensor,
        pseudo_weight: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, SegmentorOutput]:
        """``(L_guid, pseudo-label weights for MIC, the guided output)`` for a mixed batch whose ClassMix masks
        (N, H, W; 1 = pasted from the source) are ``mix_masks``."""
        target_mask = (1 - mix_masks)[:, None].float()
        views = student.views(mix_output)
        guided = [self.guider(v.features, view_mask(target_mask, v)) for v in views]
        output = student.decode_views(guided, mix_output)
        weight, mic_weight = self.weights(target_mask, views, pseudo_weight)
        return self.loss_weight * student.loss(output, pseudo_labels, weight), mic_weight, output
