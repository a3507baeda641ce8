"""The semi-supervised learner of STAL / ILM-ASSL, piece by piece: U2PL's OHEM cross-entropy and pixel contrastive
loss with its memory queues, and AEL's adaptive parts (class difficulty, adaptive equalisation sampling, adaptive
copy-paste, adaptive CutMix).

Follows licongguan/ILM-ASSL ``core/utils/loss_helper.py`` (``OhemCrossEntropy2dTensor``, ``Criterion_cons``,
``compute_contra_memobank_loss``),
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

from uda_plugins.d2 import comm
from uda_plugins.modeling import predicted_classes

from .offline_pseudo_labels import percentile

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
    "ContrastQueues",
    "pixel_contrastive_loss",
]


def ohem_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7, min_kept: int = 100000, ignore: int = 255
) -> torch.Tensor:
    """U2PL's online hard example mining (``OhemCrossEntropy2dTensor``): the mean cross-entropy over the labelled
    pixels whose probability of their label is at most ``thresh`` — or at most the ``min_kept``-th smallest such
    probability when that is higher, so at least ``min_kept`` pixels count. With fewer than ``min_kept`` labelled
    pixels (or ``min_kept`` 0) every labelled pixel counts."""
    flat = target.reshape(-1)
    valid = flat != ignore
    safe = torch.where(valid, flat, 0)
    if 0 < min_kept <= valid.sum():  # (min_kept 0 mines nothing, as released)
        prob = torch.softmax(logits.detach().float(), 1)
        label_prob = prob.gather(1, safe.view_as(target).unsqueeze(1)).reshape(-1).masked_fill(~valid, 1.0)
        kth = label_prob.kthvalue(min(flat.numel(), min_kept)).values
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
        predicted = predicted_classes(logits.detach())
        draw = torch.rand(predicted.shape, device=logits.device)
        weight = weight * (draw > 1 - keep_probability[predicted]).float()  # the reference's form of P = keep
    weight = weight / (weight.sum() + 1e-12)
    return (weight * ce).sum()


def class_confidence(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) each class's mean softmax probability over its labelled pixels, 0 for a class absent from ``labels``
    (``cal_category_confidence``: the running class criterion moves towards 0 for absent classes too, as released)."""
    logits = logits.detach().float()
    labelled = labels < num_classes
    classes = labels.where(labelled, 0).long()
    # each labelled pixel's softmax probability of its class, without the whole softmax
    own = (logits.gather(1, classes[:, None]) - logits.logsumexp(1, keepdim=True))[:, 0][labelled].exp()
    classes = classes[labelled]
    sums = torch.zeros(num_classes, device=logits.device).index_add_(0, classes, own)
    counts = torch.bincount(classes, minlength=num_classes)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


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
    if as_released:
        drop = entropy < percentile(entropy, percent)
    else:
        drop = entropy > percentile(entropy, 100 - percent)
    return torch.where(drop, torch.full_like(labels, ignore), labels)


class ContrastQueues(torch.nn.Module):
    """U2PL's memory bank of negative keys: one FIFO queue of teacher features per class, each a buffer of its own
    capacity (so they are checkpointed with the model), stored in ``dtype``: the release's 50000 + 18 x 30000 keys of
    256 channels are 0.3 GB in float16 (one padded (19, 50000, 256) float32 tensor would be 1 GB)."""

    def __init__(self, capacities: Sequence[int], dim: int, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.register_buffer("length", torch.zeros(len(capacities), dtype=torch.long))
        for c, capacity in enumerate(capacities):
            self.register_buffer(f"keys_{c}", torch.zeros(capacity, dim, dtype=dtype))

    def _keys(self, c: int) -> torch.Tensor:
        return getattr(self, f"keys_{c}")

    def get(self, c: int) -> torch.Tensor:
        return self._keys(c)[: int(self.length[c])]

    @torch.no_grad()
    def push(self, c: int, new: torch.Tensor) -> None:
        """Append ``new`` (n, dim) to class ``c``'s queue, keeping its newest keys up to its capacity
        (``dequeue_and_enqueue``). Collective: every process pushes the keys of all, in rank order, so the queues
        stay identical."""
        keys = self._keys(c)
        if comm.get_world_size() > 1:
            new = torch.cat([k.to(keys.device) for k in comm.all_gather(new.detach().cpu())])
        if not len(new):
            return
        kept = torch.cat([self.get(c), new.to(keys.dtype)])[-len(keys) :]
        keys[: len(kept)] = kept
        self.length[c] = len(kept)


def _cosine_similarities(anchors: torch.Tensor, candidates: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(Q, K) cosine similarities of ``anchors`` (Q, D) with their ``candidates`` (Q, K, D): U2PL's
    ``torch.cosine_similarity(anchor.unsqueeze(1), candidates, dim=2)`` as one batched matrix product of unit vectors
    (the broadcast form materialises Q x K x D products)."""
    a, k = F.normalize(anchors, dim=-1, eps=eps), F.normalize(candidates, dim=-1, eps=eps)
    return torch.bmm(k, a.unsqueeze(2)).squeeze(2)


def pixel_contrastive_loss(
    rep: torch.Tensor,
    rep_teacher: torch.Tensor,
    labels: torch.Tensor,
    probs: torch.Tensor,
    low_mask: torch.Tensor,
    high_mask: torch.Tensor,
    num_labelled: int,
    queues: ContrastQueues,
    class_threshold: float = 0.3,
    negative_threshold: float = 1.0,
    low_rank: int = 3,
    high_rank: int = 20,
    num_queries: int = 256,
    num_negatives: int = 50,
    temperature: float = 0.5,
) -> torch.Tensor:
    """U2PL's pixel contrastive loss (``compute_contra_memobank_loss`` without momentum prototypes) at the
    representation's resolution. ``rep`` / ``rep_teacher``: (B, D, h, w) student / teacher features of the labelled
    then the unlabelled images; ``labels``: (B, h, w) class ids (ground truth, then pseudo-labels; ignore = any id
    >= C); ``probs``: the teacher's (B, C, h, w) probabilities; ``low_mask`` / ``high_mask``: (B, h, w) anchor /
    negative candidates (low / high teacher entropy).

    Per class c: anchors = pixels of c in the low mask whose teacher probability of c exceeds ``class_threshold``;
    positive = the mean teacher feature of c's low-mask pixels; negatives = teacher features of high-mask pixels
    *not* of c for which the teacher ranks c among its top ``low_rank`` (labelled) or at ranks ``low_rank`` to
    ``high_rank`` (unlabelled) — U2PL's paper — pushed into c's queue, from which ``num_negatives`` are drawn per
    anchor; InfoNCE over cosine similarities / ``temperature`` for ``num_queries`` anchors per class, averaged over
    the classes present.

    As released (U2PL's code, which ILM-ASSL copies) the negative mask also requires the pixel *to be* of class c,
    which no labelled pixel (not of c) and no unlabelled one (c ranked 0, not 3-20) can satisfy, unless the batch
    has several unlabelled images: ``label_onehot`` scatters every image's classes into the first image's slot. With
    ILM-ASSL's one unlabelled image per GPU the queues stay empty and the term is zero; its weight 0 reproduces that.
    """
    C = probs.shape[1]
    rep_p, rep_t = rep.permute(0, 2, 3, 1), rep_teacher.detach().permute(0, 2, 3, 1)
    ranks = probs.argsort(1, descending=True).permute(0, 2, 3, 1)  # (B, h, w, C): classes by probability
    # likely[..., c]: the teacher ranks c in the top low_rank (labelled) or at low_rank..high_rank (unlabelled)
    likely = torch.zeros(ranks.shape, dtype=torch.bool, device=ranks.device)
    likely[:num_labelled].scatter_(-1, ranks[:num_labelled, :, :, :low_rank], True)
    likely[num_labelled:].scatter_(-1, ranks[num_labelled:, :, :, low_rank:high_rank], True)
    anchors, prototypes, present = [], [], []
    for c in range(C):
        is_c = labels == c
        low = is_c & low_mask.bool()
        anchors.append(rep_p[(probs[:, c] > class_threshold) & low])
        prototypes.append(rep_t[low].mean(0, keepdim=True) if low.any() else None)
        negatives = ~is_c & (labels < C) & high_mask.bool() & (probs[:, c] < negative_threshold) & likely[..., c]
        queues.push(c, rep_t[negatives])
        if low.any():
            present.append(c)
    loss = rep.sum() * 0.0
    if len(present) <= 1:  # a batch with at most one class has nothing to contrast
        return loss
    for c in present:
        queue = queues.get(c)
        if not len(anchors[c]) or not len(queue):
            continue
        anchor = anchors[c][torch.randint(len(anchors[c]), (num_queries,))]
        negative = queue[torch.randint(len(queue), (num_queries * num_negatives,))].to(rep.dtype)
        negative = negative.reshape(num_queries, num_negatives, -1)
        positive = prototypes[c].unsqueeze(0).expand(num_queries, 1, -1)
        logits = _cosine_similarities(anchor, torch.cat([positive, negative], 1))
        target = torch.zeros(num_queries, dtype=torch.long, device=rep.device)
        loss = loss + F.cross_entropy(logits / temperature, target)
    return loss / len(present)
