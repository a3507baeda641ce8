"""Guidance Training (Zhou et al., arXiv 2403.14995) as a switch on the DACS family (``UDA.GUIDANCE.LAMBDA`` > 0).

Follows ``Wenlve-Zhou/Guidance-Training`` ``seg/mmseg/models/uda/dacs.py`` and
``segmentors/{encoder_decoder,hrda_encoder_decoder}.py`` (``guidance_training``): on the features of the student's
forward of the mixed image (no second encoder pass), for each view of that forward (one; with HRDA the context view
and the detail view with the same detail crop box), the :class:`~uda_plugins.modeling.guider.Guider` replaces the
positions pasted from the source and reconstructs them from the target context; the **shared** decode head decodes
the result, and its loss is against the teacher's pseudo-label of the original, unmixed target image:

    L_guid = LAMBDA * CE_w(head(Guider(features(x_mix), m)), pseudo_labels, q * mean_views(1 - exp(-EXPONENT * r)))

(the default weighting; ``UDA.GUIDANCE.WEIGHTING`` below)
``m`` = 1 - ClassMix mask (1 = still target), ``r`` its per-image fraction of ones in each view (nearest-resized
to the view's scale and, for the detail view, cropped to its box), ``q`` the pseudo-label weights (quality weight
with the margin rules). With HRDA the loss is HRDA's (fused + detail), like the mixed loss.

A switch rather than a meta-architecture, so it composes with everything the DACS family does (MIC, HRDA, RCS, FD,
pseudo-label margins) and with the methods built on it. The Guider is a module of the meta-architecture, not of
the student: the teacher (a copy of the student) has none (the reference's teacher carries an unused one), and the
evaluated or exported student has no Guider parameters and the same inference cost.

Which weight the guidance loss (and the MIC loss after it) gets is ``UDA.GUIDANCE.WEIGHTING``:

* ``mean`` (our fix, the default): ``w = q * mean_views(f)``, ``f = 1 - exp(-EXPONENT * r_view)``; MIC keeps ``q``.
* ``as_released``: the released code (a122bbe, ``hrda_encoder_decoder.py:251-278``). ``calibrated_pseudo_weight``
  (``Guider.py:9-14``) scales the pseudo-weight tensor in place, once per view, so the detail view's factor
  multiplies the already scaled weight: ``w = q * (f_ctx + f_ctx * f_det) / 2`` (one view: ``q * f``), and the MIC
  loss that follows (``uda/dacs.py:434``, the same tensor) gets ``q * f_ctx * f_det`` (one view: ``q * f``); an image
  whose detail crop holds no target pixel gets MIC weight 0. The paper configs run this.
* ``logged``: the older code the published run came from, as far as the release shows it (below):
  ``w = q * f(r_full)``, one factor from the fraction of target pixels in the whole mixed image, after the scale
  loop; the MIC loss gets the same ``q * f(r_full)``.

What is known about the logged run (``seg/20240128_123801.log``, the only published number: 67.01 at 36k, the best
of its 20 evaluations on val; 66.67 at 40k):

* Known: its losses are ``mix.cp.decode.*`` (log:1558 ff.) and its module is ``(completor): Completor`` (log:667).
  The release keeps that code commented out as ``forward_contextual_prediction`` (``hrda_encoder_decoder.py:280-307``:
  prefix ``cp`` at :304, ``self.completor`` at :293). Its scale loop transforms only the features: ``feature_list[-1]``
  and the view's mask (nearest-resized, cropped to the detail box) go through the Completor, and the result is
  repeated 4 times for the head (:283-296), the same as HEAD's ``Guider.forward`` (``Guider.py:53-57``). Then
  ``completor.calibrated_pseudo_weight(pseudo_weight, mask)`` is called **once**, with the full-resolution ``mask``
  (:298). So ``logged`` differs from ``as_released`` only in the weights.
* Not known: the commit that ran. The repository has one code commit (87b6831); the log was added in f9ba9b1, and
  its config is ``experiments.py`` exp 81 (log:287), whose released version selects SYNTHIA with the GTA line
  commented out. The body of ``completor.calibrated_pseudo_weight`` is not released either. ``logged`` assumes it is
  HEAD's function of the same name: the factor ``1 - exp(-5 r)``, applied **in place**. That in-place write is what
  gives MIC ``q * f(r_full)``; an out-of-place version would have left MIC with ``q``.
* Not known: the Completor's architecture beyond its printed modules. The log (log:667-712) prints one
  ``Attention`` submodule holding ``patch_embed`` (Conv2d 2048->512, 4x4/4), 2 timm ``Block`` s (width 512, qkv bias,
  MLP 2048, LayerNorm eps 1e-6), ``decoder_norm``, ``decoder_pred`` (512 -> 32768 = 4*4*2048), ``conv1`` and ``conv2``
  (1x1, 2048). HEAD's Guider holds the same layers with the same shapes, split in two: ``attn`` (Aggregation:
  patch_embed, blocks, z1) and ``projector`` (decoder_norm, decoder_pred, z2). So the layers match. Not shown by a
  module print: the Completor's own parameters (mask tokens, the position embedding: how many, which names), and its
  forward (where ``conv1``/``conv2`` act, whether the offset is added to token-filled features). Nothing here
  reproduces a different Completor forward; the Guider is HEAD's.

Deviations from the release (docs/release-audit/guidance-training-quadmix.md, section 1):

====  ======================================================================================================
G1    The logged run used older code: ``WEIGHTING logged`` reproduces its weights as the commented code
      determines them (the MIC part assumes in-place semantics); the Completor's parameters and forward are
      unknown (above). Paper configs run ``as_released``.
G2    In-place weight aliasing: fixed by default (``mean``); ``as_released`` reproduces it exactly.
G3    ClassMix classes and HRDA's crop offsets: DACS-family switches (``UDA.MIX.CLASSES_FROM_BATCH``,
      ``MODEL.HRDA.REFERENCE_CROP_OFFSETS``), as released in the paper configs (``configs/Base-DAFormer-MiT-B5.yaml``).
G4    Multi-level (DAFormer-style) decode heads: a library extension with no reference (the authors' Guider supports
      only DLV2Head; their README's Notice says DAFormer-based GT loses accuracy). Warned at build.
G5    Weight decay: the logged optimizer decays everything at 0.01 (only ``head`` gets lr x10). The paper config
      ``mic_hrda_gt_dlv2_r101.yaml`` sets ``SOLVER.NO_WEIGHT_DECAY_KEYWORDS []``, so the Guider's tokens and
      LayerNorms are decayed too. ``daformer_gt_dlv2_r101.yaml``'s reference config file has ``norm`` at
      decay 0: its tokens are decayed here too, but its Guider LayerNorms get ``SOLVER.WEIGHT_DECAY_NORM`` (0.01,
      the value for ResNet's BatchNorm); no key separates them.
G6    Provenance and evaluation: the configs cite exp 81; the log evaluates every 2000 iterations, these configs
      every 4000 (the log's best, 36k, is one of ours).
G7    (``data/strong_aug.py``'s docstring; not this module.)
G8    Checkpoints: ``modeling/mmseg_conversion.py`` maps HEAD's ``guider.*`` and the log's ``completor.*`` keys onto
      the Guider (the Completor's unprinted parameters are reported as unused).
G9    Reference-side only: ``np.float`` (``Guider.py:201``) fails on NumPy >= 1.24; the port does not use it.
====  ======================================================================================================
"""

from __future__ import annotations

import logging
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from uda_plugins.d2 import CfgNode
from uda_plugins.modeling.guider import Guider
from uda_plugins.modeling.hrda import crop
from uda_plugins.modeling.segmentor import Segmentor, SegmentorOutput, View

__all__ = ["GuidanceTraining", "WEIGHTINGS", "guidance_factor", "view_target_fraction"]

logger = logging.getLogger(__name__)

# UDA.GUIDANCE.WEIGHTING: our fix, the released code, the logged run's older code (the module docstring).
WEIGHTINGS = ("mean", "as_released", "logged")


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


def _warn_if_multi_level(levels: List[str]) -> None:
    if len(levels) > 1:
        logger.warning(
            "Guidance Training with a decode head that reads %d feature levels (%s): the authors' Guider supports "
            "only DeepLab-V2's single level, and their README's Notice says DAFormer-style heads lose accuracy. "
            "Here the deepest level is reconstructed and the others are masked with learnable tokens, a library "
            "extension with no reference (uda_plugins/modeling/guider.py).",
            len(levels),
            ", ".join(levels),
        )


class GuidanceTraining(nn.Module):
    def __init__(self, cfg: CfgNode, student: Segmentor) -> None:
        super().__init__()
        g = cfg.UDA.GUIDANCE
        self.loss_weight = float(g.LAMBDA)
        self.exponent = float(g.EXPONENT)
        if g.WEIGHTING not in WEIGHTINGS:
            raise ValueError(f"UDA.GUIDANCE.WEIGHTING must be one of {WEIGHTINGS}, not '{g.WEIGHTING}'")
        self.weighting = g.WEIGHTING
        shapes = student.backbone.output_shape()
        levels = student.decoder_levels
        guided = g.FEATURE or levels[-1]
        if guided not in levels:
            raise ValueError(f"UDA.GUIDANCE.FEATURE '{guided}' is not a level the decode head reads: {levels}")
        _warn_if_multi_level(levels)
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
        """(guidance pixel weights, the pseudo-label weights the MIC loss then uses), per ``UDA.GUIDANCE.WEIGHTING``."""
        if self.weighting == "logged":  # one factor from the whole mask (hrda_encoder_decoder.py:298), in place
            scaled = pseudo_weight * guidance_factor(target_mask.flatten(1).mean(1), self.exponent)[:, None, None]
            return scaled, scaled
        factors = [guidance_factor(view_target_fraction(target_mask, v), self.exponent) for v in views]
        if self.weighting == "mean":
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
