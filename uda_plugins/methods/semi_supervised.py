"""The semi-supervised learner of STAL / ILM-ASSL, piece by piece: U2PL's OHEM cross-entropy and AEL's adaptive
parts (class difficulty, adaptive equalisation sampling, adaptive copy-paste, adaptive CutMix).

Follows licongguan/ILM-ASSL ``core/utils/loss_helper.py`` (``OhemCrossEntropy2dTensor``, ``Criterion_cons``),
``core/utils/utils.py`` (``cal_category_confidence``, ``dynamic_copy_paste``, ``sample_from_bank``,
``generate_cutmix``, ``init_cutmix``, ``update_cutmix_bank``) and ``train.py`` (the class draws, the unlabelled
pseudo-label filter). Random draws use torch's global generator (seeded per iteration by the trainer).

Where the released code assumes square crops (``area = h ** 2``), areas here are h * w. The adaptive
equalisation sampling draws one random number per pixel of every image (the reference draws one map per class and
shares it across the batch).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ohem_cross_entropy",
    "confidence_weighted_consistency",
    "class_confidence",
    "draw_query_classes",
    "copy_paste",
    "draw_cutmix_source",
    "cutmix_box",
    "random_half_box",
    "update_cutmix_bank",
    "filter_unlabelled_pseudo_labels",
]


def ohem_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7, min_kept: int = 100000, ignore: int = 255
) -> torch.Tensor:
    """U2PL's online hard example mining (``OhemCrossEntropy2dTensor``): the mean cross-entropy over the labelled
    pixels whose probability of their label is at most ``thresh`` — or at most the ``min_kept``-th smallest such
    probability when that is higher, so at least ``min_kept`` pixels count. With fewer than ``min_kept`` labelled
    pixels (or ``min_kept`` 0) every labelled pixel counts."""
    C = logits.shape[1]
    flat = target.reshape(-1)
    valid = flat != ignore
    safe = torch.where(valid, flat, 0)
    if 0 < min_kept <= valid.sum():  # (min_kept 0 mines nothing, as released)
        prob = torch.softmax(logits.detach().float(), 1).transpose(0, 1).reshape(C, -1)
        prob = prob.masked_fill(~valid, 1.0)
        label_prob = prob[safe, torch.arange(flat.numel(), device=flat.device)]
        kth = label_prob.sort().values[min(flat.numel(), min_kept) - 1]
        threshold = torch.maximum(torch.tensor(thresh, device=logits.device), kth)
        valid = valid & (label_prob <= threshold)
    kept = torch.where(valid, flat, ignore).view_as(target)
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), kept, ignore_index=ignore)


def confidence_weighted_consistency(
    logits: torch.Tensor,
    confidence: torch.Tensor,
    pseudo_labels: torch.Tensor,
    class_criterion: torch.Tensor = None,
    gamma: float = 2.0,
    gamma2: float = 1.0,
    ignore: int = 255,
) -> torch.Tensor:
    """AEL's consistency (``Criterion_cons``): the cross-entropy to the teacher's labels weighted by the teacher's
    confidence ** ``gamma``, normalised to sum 1 over the batch. With ``class_criterion`` (each class's running
    confidence), **adaptive equalisation sampling** keeps a pixel the student predicts as class c with probability
    ``((1 - cc_c) / max(1 - cc)) ** gamma2``: well-learnt classes are sampled less."""
    ce = F.cross_entropy(logits.float(), pseudo_labels, ignore_index=ignore, reduction="none")
    weight = confidence.float() ** gamma
    if class_criterion is not None:
        difficulty = 1 - class_criterion.float()
        keep_probability = (difficulty / (difficulty.max() + 1e-12)) ** gamma2
        predicted = logits.detach().argmax(1)
        draw = torch.rand(predicted.shape, device=logits.device)
        weight = weight * (draw > 1 - keep_probability[predicted]).float()  # the reference's form of P = keep
    weight = weight / (weight.sum() + 1e-12)
    return (weight * ce).sum()


def class_confidence(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) each class's mean softmax probability over its labelled pixels, 0 for a class absent from ``labels``
    (``cal_category_confidence``: the running class criterion moves towards 0 for absent classes too, as released)."""
    probs = torch.softmax(logits.detach().float(), 1)
    out = torch.zeros(num_classes, device=logits.device)
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            out[c] = (probs[:, c] * mask).sum() / mask.sum()
    return out


def draw_query_classes(class_criterion: torch.Tensor, candidates: Sequence[int], draws: int = 3) -> List[int]:
    """ACP's and ACM's class draws (``train.py``): ``draws`` draws from ``candidates`` with P proportional to
    ``exp(sqrt(1 - cc_c))``, duplicates removed (order of first draw)."""
    cc = class_criterion.detach().float().cpu()[list(candidates)]
    p = torch.softmax((1 - cc).clamp(min=0).sqrt(), 0)
    picks = torch.multinomial(p, draws, replacement=True).tolist()
    return list(dict.fromkeys(int(candidates[k]) for k in picks))


def copy_paste(
    images: torch.Tensor, labels: torch.Tensor, paste_images: torch.Tensor, paste_labels: torch.Tensor, classes
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ACP (``dynamic_copy_paste``): the pixels of ``classes`` in each paste label, with their image, pasted onto
    the labelled batch (a paste label that is all class 0 leaves its sample unchanged, as released)."""
    alpha = torch.zeros_like(paste_labels, dtype=torch.bool)
    for c in classes:
        alpha |= paste_labels == c
    alpha &= (paste_labels != 0).flatten(1).any(1)[:, None, None]  # torch.sum(paste_label) == 0 -> untouched
    out_images = torch.where(alpha[:, None], paste_images, images)
    out_labels = torch.where(alpha, paste_labels, labels)
    return out_images, out_labels


def draw_cutmix_source(cutmix_bank: torch.Tensor, class_criterion: torch.Tensor) -> Tuple[int, int]:
    """ACM (``sample_from_bank``): a class with P proportional to ``exp(1 - cc_c)``, then an image of the bank that
    shows it (any image if none does). Returns (image index, class)."""
    p = torch.softmax(1 - class_criterion.detach().float().cpu(), 0)
    c = int(torch.multinomial(p, 1))
    holders = torch.nonzero(cutmix_bank[c].cpu()).flatten()
    if len(holders):
        return int(holders[torch.randint(len(holders), ())]), c
    return int(torch.randint(cutmix_bank.shape[1], ())), c


def random_half_box(height: int, width: int) -> Tuple[int, int, int, int]:
    """``init_cutmix``: a box of half the crop's area, aspect ratio log-uniform, uniformly placed; (y0, x0, y1, x1)."""
    y_prop = math.exp(float(torch.rand(())) * math.log(0.5))
    x_prop = 0.5 / y_prop
    h, w = round(y_prop * height), round(x_prop * width)
    y0, x0 = round((height - h) * float(torch.rand(()))), round((width - w) * float(torch.rand(())))
    return y0, x0, y0 + h, x0 + w


def cutmix_box(prediction: np.ndarray, class_id: int, area_thresh: float = 0.005) -> Tuple[int, int, int, int]:
    """ACM's box (``generate_cutmix`` with ``no_pad``, ``no_slim`` as every released config): the bounding box of a
    random connected region (8-connectivity) of ``class_id`` in the teacher's prediction covering more than
    ``area_thresh`` of the crop, or a random half-area box when there is none; (y0, x0, y1, x1), end-exclusive."""
    height, width = prediction.shape
    count, regions, stats, _ = cv2.connectedComponentsWithStats(
        (prediction == class_id).astype(np.uint8), connectivity=8
    )
    order = (torch.randperm(count - 1) + 1).tolist() if count > 1 else []
    for k in order:
        if stats[k, cv2.CC_STAT_AREA] > area_thresh * height * width:
            x, y, w, h = (
                int(stats[k, i]) for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT)
            )
            return y, x, y + h, x + w
    return random_half_box(height, width)


def update_cutmix_bank(
    cutmix_bank: torch.Tensor, predictions: torch.Tensor, indices: Sequence[int], area_thresh: float = 0.01
) -> None:
    """``update_cutmix_bank``: for each image ``indices[k]``, mark the classes covering at least ``area_thresh`` of
    its teacher prediction ``predictions[k]`` (class maps, (K, H, W)) and unmark the others. In place."""
    area = predictions.shape[-2] * predictions.shape[-1]
    counts = F.one_hot(predictions.long().flatten(1), cutmix_bank.shape[0]).sum(1)  # (K, C)
    for k, index in enumerate(indices):
        cutmix_bank[:, index] = (counts[k] >= area_thresh * area).to(cutmix_bank.dtype).to(cutmix_bank.device)


def filter_unlabelled_pseudo_labels(
    labels: torch.Tensor, entropy: torch.Tensor, percent: float, as_released: bool = False, ignore: int = 255
) -> torch.Tensor:
    """The unlabelled pseudo-labels with a ``percent`` of the pixels ignored by entropy (``percent`` = 20 x (1 -
    epoch / epochs) in ``train.py``). By default the **most uncertain** pixels go (U2PL's rule); ``as_released``
    reproduces ILM-ASSL's code, which ignores the *most confident* ones (entropy below the percentile,
    docs/methods.md §6.9.2)."""
    flat = entropy.detach().flatten().double().cpu().numpy()
    if as_released:
        threshold = float(np.percentile(flat, percent))
        drop = entropy < threshold
    else:
        threshold = float(np.percentile(flat, 100 - percent))
        drop = entropy > threshold
    return torch.where(drop, torch.full_like(labels, ignore), labels)
