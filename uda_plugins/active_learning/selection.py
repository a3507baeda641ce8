"""Which target images to label next: image scores, per-group quotas and the selection strategies.

Follows licongguan/ILM-ASSL ``core/active_learning/Semi-sup_active_pu.py`` (``prediction_uncertainty``: an image's
score is the mean over its pixels of the normalised entropy ``-sum_c p log(p + 1e-6) / log C``) and
``img_select_based_entropy.py`` (``every_city_num``, ``get_second_dict``: a quota per city proportional to its
images not yet labelled; in each city the highest-scored images not yet labelled).

Quotas (``allocate_quotas``): the reference computes ``round(n * (N_g - L_g) / N)`` with N = *all* images and
gives the last city whatever makes the total n, so the last city absorbs both the rounding and the share of the
images already labelled (``rule="reference"``). The default, ``"largest_remainder"``, splits n in proportion to
the images each group has left (Hamilton's method), never asks a group for more images than it has left and
hands the excess to the others.

Strategies are registered in :data:`SELECTION_STRATEGIES` (name -> function of (scores, candidates, quota, rng)
returning the picked indices): ``"entropy"`` (the reference), ``"random"`` (the baseline every active-learning
study needs); a region-based strategy registers the same way with its own scores.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from fvcore.common.registry import Registry

__all__ = [
    "SELECTION_STRATEGIES",
    "image_entropy",
    "allocate_quotas",
    "select_images",
    "group_of",
]

SELECTION_STRATEGIES = Registry("ACTIVE_SELECTION")
SELECTION_STRATEGIES.__doc__ = "Active-learning strategies: (scores, candidates, quota, rng) -> picked indices."


def image_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(N,) mean normalised pixel entropy of softmax ``probs`` (N, C, H, W), the reference's image score."""
    C = probs.shape[1]
    entropy = (-probs * torch.log(probs + 1e-6)).sum(1) / math.log(C)
    return entropy.flatten(1).mean(1)


def group_of(file_name: str) -> str:
    """The group of an image for quotas: its folder's name (Cityscapes' city)."""
    import os

    return os.path.basename(os.path.dirname(file_name))


def allocate_quotas(
    n: int, group_sizes: Dict[str, int], labelled: Dict[str, int], rule: str = "largest_remainder"
) -> Dict[str, int]:
    """How many images each group contributes to a round of ``n`` (groups in the order of ``group_sizes``)."""
    left = {g: group_sizes[g] - labelled.get(g, 0) for g in group_sizes}
    if n > sum(left.values()):
        raise ValueError(f"A round of {n} images, but only {sum(left.values())} are not labelled yet")
    if rule == "reference":
        total = sum(group_sizes.values())
        quotas = {g: round(n * left[g] / total) for g in group_sizes}
        last = list(group_sizes)[-1]
        quotas[last] = n - sum(q for g, q in quotas.items() if g != last)
        return quotas
    if rule != "largest_remainder":
        raise ValueError(f"Unknown quota rule '{rule}' (largest_remainder or reference)")
    quotas = {g: 0 for g in group_sizes}
    remaining, open_groups = n, [g for g in group_sizes if left[g] > 0]
    while remaining > 0:
        weight = sum(left[g] - quotas[g] for g in open_groups)
        exact = {g: remaining * (left[g] - quotas[g]) / weight for g in open_groups}
        share = {g: min(int(math.floor(exact[g])), left[g] - quotas[g]) for g in open_groups}
        given = sum(share.values())
        by_remainder = sorted(
            open_groups, key=lambda g: (-(exact[g] - math.floor(exact[g])), list(group_sizes).index(g))
        )
        for g in by_remainder[: remaining - given]:
            if share[g] < left[g] - quotas[g]:
                share[g] += 1
        for g in open_groups:
            quotas[g] += share[g]
        remaining -= sum(share.values())
        open_groups = [g for g in open_groups if quotas[g] < left[g]]
    return quotas


@SELECTION_STRATEGIES.register()
def entropy(scores: np.ndarray, candidates: np.ndarray, quota: int, rng: np.random.Generator) -> np.ndarray:
    """The ``quota`` most uncertain candidates (highest score; ties by index)."""
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:quota]]


@SELECTION_STRATEGIES.register()
def random(scores: np.ndarray, candidates: np.ndarray, quota: int, rng: np.random.Generator) -> np.ndarray:
    """``quota`` candidates uniformly at random."""
    return rng.choice(candidates, size=quota, replace=False)


def select_images(
    n: int,
    groups: Sequence[str],
    labelled: np.ndarray,
    strategy: str,
    scores: Optional[np.ndarray] = None,
    rng: Optional[np.random.Generator] = None,
    quota_rule: str = "largest_remainder",
) -> List[int]:
    """Indices of the ``n`` images to label next: per-group quotas, then ``strategy`` within each group among the
    images not yet ``labelled`` (bool per image). Sorted."""
    pick: Callable = SELECTION_STRATEGIES.get(strategy)
    labelled = np.asarray(labelled, dtype=bool)
    groups = np.asarray(groups)
    names = list(dict.fromkeys(groups.tolist()))  # first-appearance order (dataset order)
    sizes = {g: int((groups == g).sum()) for g in names}
    done = {g: int((labelled & (groups == g)).sum()) for g in names}
    quotas = allocate_quotas(n, sizes, done, quota_rule)
    scores = np.zeros(len(groups)) if scores is None else np.asarray(scores, dtype=np.float64)
    rng = rng or np.random.default_rng(0)
    picked: List[int] = []
    for g in names:
        if quotas[g] <= 0:
            continue
        candidates = np.flatnonzero((groups == g) & ~labelled)
        picked += [int(i) for i in pick(scores, candidates, min(quotas[g], len(candidates)), rng)]
    return sorted(picked)
