"""Selecting and correcting hard pseudo-labels: per-class top fractions, DUDA's temporal-consistency rule and
IAST's instance-adaptive selection of an initial bank.

Sources: parquets/DUDA ``trainers/uda_trainer.py`` (``get_threshold``, ``generate_online_pseudo``,
``update_offline_pseudo``, ``adjust_alpha``, ``adjust_beta``) and IAST's ``IASPseudoGenerator`` (Mei et al., ECCV
2020; DUDA's initial ``pseudo_label_0.45`` was made by it, its generator is not in the DUDA repository).
The DUDA thresholds are numpy percentiles on the host there; here they are computed on the device with one sort
(no host sync) and give the same values (linear interpolation, as ``np.percentile``).
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

from uda_plugins.modeling import class_maximum, predicted_classes

__all__ = [
    "percentile",
    "class_percentile_thresholds",
    "median_entropy_pseudo_labels",
    "keep_top_fraction",
    "temporal_consistency_update",
    "ramp",
    "InstanceAdaptiveSelector",
]


def _sorted_per_class(
    values: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``values`` sorted within each class, classes in order: (sorted values, per-class counts, per-class start
    offsets). Two sorts on the device (by value, then stably by class), no host sync."""
    v, lab = values.reshape(-1), labels.reshape(-1).long()
    order = torch.argsort(v, stable=True)
    v, lab = v[order], lab[order]
    order = torch.argsort(lab, stable=True)
    v, lab = v[order], lab[order]
    counts = torch.bincount(lab, minlength=num_classes)[:num_classes]
    return v, counts, torch.cumsum(counts, 0) - counts


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile of all ``values`` as a 0-d float64 tensor on their device, bitwise ``np.percentile``
    (linear interpolation, numpy's two-sided lerp) without a host sync: the ranks depend only on the element count.
    Two selections in linear time, not a sort."""
    flat = values.detach().reshape(-1).double()
    if flat.numel() == 0:
        raise ValueError("percentile of an empty tensor")
    position = (flat.numel() - 1) * (float(q) / 100.0)
    low = math.floor(position)
    t = position - low
    a = flat.kthvalue(low + 1).values
    b = flat.kthvalue(low + 2).values if low + 1 < flat.numel() else a
    return b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t


def class_percentile_thresholds(
    confidence: torch.Tensor, labels: torch.Tensor, fraction: float, num_classes: int
) -> torch.Tensor:
    """Per class c, the ``(1 - fraction) * 100``-th percentile (linear interpolation) of the confidence of the
    pixels labelled c; 0 for classes without pixels -> (num_classes,) float."""
    conf, counts, starts = _sorted_per_class(confidence.float(), labels, num_classes)
    position = (counts - 1).clamp(min=0).float() * (1.0 - float(fraction))
    low = position.floor().long()
    high = torch.minimum(low + 1, (counts - 1).clamp(min=0))
    last = max(conf.numel() - 1, 0)
    v_low = conf[(starts + low).clamp(max=last)] if conf.numel() else torch.zeros(num_classes)
    v_high = conf[(starts + high).clamp(max=last)] if conf.numel() else torch.zeros(num_classes)
    values = v_low + (v_high - v_low) * (position - low.float())
    return torch.where(counts > 0, values, torch.zeros_like(values))


def keep_top_fraction(
    probs: torch.Tensor, fraction: float, ignore_index: int = 255, cap: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DUDA's per-class selection: argmax labels of softmax ``probs`` (N, C, H, W) where the confidence is at least
    the class's ``(1 - fraction)`` percentile over the whole batch (thresholds capped at ``cap``), ``ignore_index``
    elsewhere. Returns (selected labels, argmax labels, confidence), each (N, H, W)."""
    confidence, labels = class_maximum(probs)
    thresholds = class_percentile_thresholds(confidence, labels, fraction, probs.shape[1]).clamp(max=cap)
    selected = torch.where(confidence < thresholds[labels], torch.full_like(labels, ignore_index), labels)
    return selected, labels, confidence


def temporal_consistency_update(
    old: torch.Tensor, prediction: torch.Tensor, candidate: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """DUDA's offline update of one label map: where the old label is set, keep it if the teacher's prediction
    agrees and erase it (``ignore_index``) if not; where it is not set, take the confident ``candidate`` (the
    prediction with unconfident pixels already ``ignore_index``)."""
    labelled = old != ignore_index
    kept = torch.where(prediction == old, old, torch.full_like(old, ignore_index))
    return torch.where(labelled, kept, candidate.to(old.dtype))


def ramp(iteration: int, start: float, end: float, origin: int, length: int, power: float) -> float:
    """``start + ((iteration - origin) / (length - origin)) ** power * (end - start)`` (DUDA's alpha/beta
    schedules), clamped to [start, end]."""
    if length <= origin:
        return end
    t = min(max((iteration - origin) / (length - origin), 0.0), 1.0)
    return start + t**power * (end - start)


class InstanceAdaptiveSelector:
    """IAST's instance-adaptive selection (``IASPseudoGenerator``): class thresholds start at 0.9; for each image,
    ``new_c = quantile([threshold_c] + confidences of pixels predicted c, 1 - proportion * threshold_c ** gamma)``,
    ``threshold_c <- momentum * threshold_c + (1 - momentum) * new_c`` (values >= 1 become 0.999), then the pixels
    below their class's threshold are ignored. Images are processed in order (the thresholds are a running state).
    IAST's defaults: proportion 0.2 (DUDA's bank: 0.45), momentum 0.9, gamma 8."""

    def __init__(self, num_classes: int, proportion: float, momentum: float, gamma: float, ignore_index: int = 255):
        self.thresholds = np.full(num_classes, 0.9, dtype=np.float64)
        self.proportion, self.momentum, self.gamma = float(proportion), float(momentum), float(gamma)
        self.ignore_index = ignore_index

    def __call__(self, confidence: np.ndarray, prediction: np.ndarray) -> np.ndarray:
        """(H, W) float confidence and int prediction of one image -> its uint8 pseudo-label."""
        new = np.ones_like(self.thresholds)
        for c in range(len(self.thresholds)):
            values = np.concatenate([[self.thresholds[c]], confidence[prediction == c].astype(np.float64)])
            new[c] = np.quantile(values, 1.0 - self.proportion * self.thresholds[c] ** self.gamma)
        self.thresholds = self.momentum * self.thresholds + (1.0 - self.momentum) * new
        self.thresholds[self.thresholds >= 1] = 0.999
        label = prediction.astype(np.uint8).copy()
        label[confidence < self.thresholds[prediction]] = self.ignore_index
        return label


def median_entropy_pseudo_labels(
    probs: torch.Tensor, floor: float = 0.25, ignore_index: int = 255
) -> Tuple[torch.Tensor, torch.Tensor]:
    """MCL's selection of soft pseudo-labels (feifei-cv/MCL ``models/adaptation_modelv2.py``, ``step``): the argmax
    of ``probs`` (N, C, H, W) where the pixel's normalised entropy is below ``max(floor, theta_c)``, ``theta_c`` =
    the batch's "median" entropy of the pixels predicted c, taken as the reference does: the sorted values at index
    ``round(n / 2)`` (half to even). Returns (labels with ``ignore_index`` elsewhere, the entropy map), (N, H, W)."""
    C = probs.shape[1]
    entropy = (-probs * torch.log2(probs + 1e-30)).sum(1) / math.log2(C)
    labels = predicted_classes(probs)
    h, counts, starts = _sorted_per_class(entropy, labels, C)
    index = (starts + torch.round(counts.double() * 0.5).long()).clamp(max=max(h.numel() - 1, 0))
    theta = torch.where(counts > 0, h[index], torch.zeros_like(h[index]))
    keep = entropy < theta.clamp(min=floor)[labels]
    return torch.where(keep, labels, torch.full_like(labels, ignore_index)), entropy
