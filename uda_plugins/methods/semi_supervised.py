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
shares it across the batch). The contrastive term samples as U2PL's paper defines it
(:func:`draw_contrastive_samples`) or as the released code does (:func:`draw_contrastive_samples_as_released`, with
:func:`contrastive_inputs` ``align_corners=True`` and :func:`release_label_onehot`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from uda_plugins.d2 import comm
from uda_plugins.modeling import predicted_classes

from .offline_pseudo_labels import percentile

__all__ = [
    "label_probability",
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
    "batch_groups",
    "ContrastQueues",
    "ContrastiveDraw",
    "draw_contrastive_samples",
    "draw_contrastive_samples_as_released",
    "release_label_onehot",
    "contrastive_inputs",
    "info_nce_loss",
    "pixel_contrastive_loss",
]


def label_probability(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) each pixel's softmax probability of its label, 1 where it has none (ids >= ``num_classes``): what
    OHEM mines and the class criterion averages, computed once (without the whole softmax)."""
    logits = logits.detach().float()
    labelled = labels < num_classes
    own = logits.gather(1, labels.where(labelled, 0).long()[:, None]) - logits.logsumexp(1, keepdim=True)
    return own[:, 0].exp().masked_fill(~labelled, 1.0)


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    thresh: float = 0.7,
    min_kept: int = 100000,
    ignore: int = 255,
    label_prob: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """U2PL's online hard example mining (``OhemCrossEntropy2dTensor``): the mean cross-entropy over the labelled
    pixels whose probability of their label is at most ``thresh`` — or at most the ``min_kept``-th smallest such
    probability when that is higher, so at least ``min_kept`` pixels count. With fewer than ``min_kept`` labelled
    pixels (or ``min_kept`` 0) every labelled pixel counts. ``label_prob``: :func:`label_probability` of ``logits``
    when the caller has it."""
    flat = target.reshape(-1)
    valid = flat != ignore
    if 0 < min_kept <= valid.sum():  # (min_kept 0 mines nothing, as released)
        if label_prob is None:
            label_prob = label_probability(
                logits, torch.where(valid, flat, logits.shape[1]).view_as(target), logits.shape[1]
            )
        label_prob = label_prob.reshape(-1)
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


def class_confidence(label_prob: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) each class's mean softmax probability over its labelled pixels (``label_prob``: :func:`label_probability`),
    0 for a class absent from ``labels`` (``cal_category_confidence``: the running class criterion moves towards 0 for
    absent classes too, as released)."""
    labelled = labels < num_classes
    classes = labels[labelled].long()
    sums = torch.zeros(num_classes, device=label_prob.device).index_add_(0, classes, label_prob[labelled].float())
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


def paste_with_probability(paste_labels: torch.Tensor, prob: float) -> torch.Tensor:
    """Each sample's paste label kept with probability ``prob``, else all zero, which :func:`copy_paste` leaves
    untouched: the release loads a paste sample only when ``random.random() > acp.prob`` (0.5) and an all-zero one
    otherwise (``cityscapes_semi_cp.py:179-192,220-226``). Draws from torch's global generator."""
    if prob >= 1.0:
        return paste_labels
    pasted = (torch.rand(len(paste_labels)) < prob).to(paste_labels.device)
    return torch.where(pasted[:, None, None], paste_labels, torch.zeros_like(paste_labels))


def draw_cutmix_source(
    cutmix_bank: torch.Tensor, class_criterion: torch.Tensor, pool: Optional[torch.Tensor] = None
) -> Tuple[int, int]:
    """ACM (``sample_from_bank``): a class with P proportional to ``exp(1 - cc_c)``, then an image of the bank that
    shows it (any image if none does). ``pool`` (a bool mask over the bank's images, None = all): the images a
    partner may be, as the release's bank holds only its unlabelled images. Returns (image index, class)."""
    p = torch.softmax(1 - class_criterion.detach().float().cpu(), 0)
    c = int(torch.multinomial(p, 1))
    shows = cutmix_bank[c].cpu().bool()
    pool = torch.ones_like(shows) if pool is None else pool.cpu().bool()
    holders = torch.nonzero(shows & pool).flatten()
    holders = holders if len(holders) else torch.nonzero(pool).flatten()
    return int(holders[torch.randint(len(holders), ())]), c


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
    K, C = len(predictions), cutmix_bank.shape[0]
    area = predictions.shape[-2] * predictions.shape[-1]
    image = torch.arange(K, device=predictions.device)[:, None] * C
    counts = torch.bincount((image + predictions.long().flatten(1)).flatten(), minlength=K * C).view(K, C)
    for k, index in enumerate(indices):
        cutmix_bank[:, index] = (counts[k] >= area_thresh * area).to(cutmix_bank.dtype).to(cutmix_bank.device)


def batch_groups(batch_size: int, group_size: int, key: str = "group size") -> List[slice]:
    """The batch in consecutive groups of ``group_size`` images (one group for 0 or a size of the batch or more): the
    release computes its batch-wide statistics per GPU (OHEM's minimum kept, the consistency's normalisation, the
    entropy percentile), so one process standing for several GPUs computes them per group. ``key`` names the setting
    in the message when the batch does not split evenly."""
    if group_size <= 0 or group_size >= batch_size:
        return [slice(0, batch_size)]
    if batch_size % group_size:
        raise ValueError(f"A batch of {batch_size} images per process does not split into groups of {key} {group_size}")
    return [slice(k, k + group_size) for k in range(0, batch_size, group_size)]


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
    256 channels are 0.3 GB in float16 (one padded (19, 50000, 256) float32 tensor would be 1 GB). Each buffer is a
    ring: a push writes its keys over the oldest ones (``start`` marks the oldest key of a full queue), so nothing is
    moved when keys arrive."""

    def __init__(self, capacities: Sequence[int], dim: int, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.register_buffer("length", torch.zeros(len(capacities), dtype=torch.long))
        self.register_buffer("start", torch.zeros(len(capacities), dtype=torch.long))
        for c, capacity in enumerate(capacities):
            self.register_buffer(f"keys_{c}", torch.zeros(capacity, dim, dtype=dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints written before the ring buffers kept every queue oldest-first from row 0: start 0.
        state_dict.setdefault(prefix + "start", torch.zeros_like(self.start))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _keys(self, c: int) -> torch.Tensor:
        return getattr(self, f"keys_{c}")

    @property
    def capacities(self) -> List[int]:
        return [len(self._keys(c)) for c in range(len(self.length))]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys_0.dtype

    def storage(self, c: int) -> Tuple[torch.Tensor, int]:
        """Class ``c``'s keys in storage order and the row of the oldest: queue position i is storage row
        ``(start + i) % len(keys)``."""
        return self._keys(c)[: int(self.length[c])], int(self.start[c])

    def get(self, c: int) -> torch.Tensor:
        """Class ``c``'s keys, oldest first (a copy when the ring has wrapped)."""
        keys, start = self.storage(c)
        return torch.cat([keys[start:], keys[:start]]) if start else keys

    @torch.no_grad()
    def push(self, c: int, new: torch.Tensor) -> None:
        """Append ``new`` (n, dim) to class ``c``'s queue (see :meth:`push_many`)."""
        counts = [0] * len(self.length)
        counts[c] = len(new)
        self.push_many(counts, new)

    @torch.no_grad()
    def push_many(self, counts: Sequence[int], keys: torch.Tensor) -> None:
        """Append to each class c's queue the next ``counts[c]`` rows of ``keys`` (rows grouped by class), keeping
        its newest keys up to its capacity (``dequeue_and_enqueue``). Collective (one gather for all the classes):
        every process pushes the keys of all, in rank order, so the queues stay identical."""
        per_process = [keys.detach().split(list(counts))]
        if comm.get_world_size() > 1:
            per_process = [k.split(n) for n, k in comm.all_gather((list(counts), keys.detach().cpu()))]
        lengths, starts = self.length.tolist(), self.start.tolist()  # (one read of each, not one per class)
        for c in range(len(lengths)):
            new = [split[c] for split in per_process if len(split[c])]
            if new:
                self._append(c, torch.cat(new) if len(new) > 1 else new[0], lengths[c], starts[c])

    def _append(self, c: int, new: torch.Tensor, length: int, start: int) -> None:
        keys = self._keys(c)
        capacity = len(keys)
        new = new[-capacity:].to(keys)
        write = (start + length) % capacity  # the row after the newest key
        first = min(len(new), capacity - write)
        keys[write : write + first] = new[:first]
        keys[: len(new) - first] = new[first:]  # the rest wraps around to the front
        self.start[c] = (start + max(length + len(new) - capacity, 0)) % capacity
        self.length[c] = min(length + len(new), capacity)


def _top_classes(probs: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C) bool: each row's ``k`` most probable classes (top-k selection, not a sort of all C)."""
    if k >= probs.shape[1]:
        return torch.ones_like(probs, dtype=torch.bool)
    top = torch.zeros_like(probs, dtype=torch.bool)
    return top.scatter_(1, probs.topk(k, 1).indices, True) if k > 0 else top


def _push_negatives(queues: ContrastQueues, negative: torch.Tensor, keys: torch.Tensor) -> None:
    """Push ``keys[p]`` into class c's queue for every ``negative[p, c]`` (N pixels x C), in pixel order, gathering only
    the keys each queue can keep (its newest, up to its capacity)."""
    classes, pixels = torch.nonzero(negative.T, as_tuple=True)  # grouped by class, each in pixel order
    counts = torch.bincount(classes, minlength=negative.shape[1])
    capacities = torch.tensor(queues.capacities, device=counts.device)
    from_the_end = counts.cumsum(0)[classes] - 1 - torch.arange(len(classes), device=classes.device)
    kept = from_the_end < capacities[classes]
    stored = keys.to(queues.dtype)  # (cast before the gather: half the bytes to copy in float16)
    queues.push_many(torch.minimum(counts, capacities).tolist(), stored.index_select(0, pixels[kept]))


@dataclass
class ContrastiveDraw:
    """The samples of one step's contrastive term (:func:`draw_contrastive_samples`): for each contrasted class,
    ``num_queries`` anchor pixels (indices into the (B * h * w) flattened representation), its unit prototype and its
    (num_queries, num_negatives, D) unit negative keys; ``num_present``: the number of classes the loss averages over
    (those present in the batch, contrasted or not)."""

    anchor_pixels: torch.Tensor
    prototypes: torch.Tensor
    negatives: List[torch.Tensor]
    num_present: int


def pixel_contrastive_loss(
    rep: torch.Tensor,
    rep_teacher: torch.Tensor,
    labels: torch.Tensor,
    probs: torch.Tensor,
    low_mask: torch.Tensor,
    high_mask: torch.Tensor,
    num_labelled: int,
    queues: ContrastQueues,
    temperature: float = 0.5,
    as_released: bool = False,
    **sampling,
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
    the classes present. ``sampling``: the thresholds, ranks and counts of :func:`draw_contrastive_samples`.

    ``as_released``: the release's sampling instead (:func:`draw_contrastive_samples_as_released`: negatives must *be*
    of the class, ``label_onehot``'s batch slot 0, the release's pairing of anchors and queues); its inputs formed as
    the release forms them by :func:`contrastive_inputs` with ``align_corners=True``.
    """
    draw_samples = draw_contrastive_samples_as_released if as_released else draw_contrastive_samples
    draw = draw_samples(rep_teacher, labels, probs, low_mask, high_mask, num_labelled, queues, **sampling)
    return info_nce_loss(rep, draw, temperature)


@torch.no_grad()
def draw_contrastive_samples(
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
) -> Optional[ContrastiveDraw]:
    """The bookkeeping of :func:`pixel_contrastive_loss`: pushes this step's negative keys into the queues and draws
    the anchors and negatives (in the release's order of random draws); None when there is nothing to contrast."""
    C, D = probs.shape[1], rep_teacher.shape[1]
    num_labelled_pixels = num_labelled * labels[0].numel()
    # Pixels flattened in (image, y, x) order, the order boolean-mask indexing of (B, h, w) enumerates them in, so the
    # queues receive the same keys in the same order as a per-class loop of masks would push them.
    rep_t = rep_teacher.detach().permute(0, 2, 3, 1).reshape(-1, D)
    probs_p = probs.permute(0, 2, 3, 1).reshape(-1, C)
    labels, low, high = labels.reshape(-1), low_mask.reshape(-1).bool(), high_mask.reshape(-1).bool()
    labelled = labels < C
    classes = torch.where(labelled, labels, C).long()  # C = ignored
    own_probability = probs_p.gather(1, classes.clamp(max=C - 1)[:, None])[:, 0]
    # A pixel is of one class, so it is a prototype pixel (and an anchor candidate) of its own class only.
    prototype_class = torch.where(low, classes, C)
    anchor_class = torch.where(own_probability > class_threshold, prototype_class, C)
    prototype_counts = torch.bincount(prototype_class, minlength=C + 1)[:C]
    prototypes = torch.zeros(C + 1, D, dtype=rep_t.dtype, device=rep_t.device).index_add_(0, prototype_class, rep_t)
    prototypes = prototypes[:C] / prototype_counts.clamp(min=1)[:, None].to(rep_t.dtype)
    # negative[p, c]: the teacher ranks c in the top low_rank (labelled images) or at low_rank..high_rank (unlabelled)
    labelled_top = _top_classes(probs_p[:num_labelled_pixels], low_rank)
    unlabelled_probs = probs_p[num_labelled_pixels:]
    unlabelled_ranked = _top_classes(unlabelled_probs, high_rank) & ~_top_classes(unlabelled_probs, low_rank)
    negative = torch.cat([labelled_top, unlabelled_ranked])
    negative &= (high & labelled)[:, None] & (probs_p < negative_threshold)
    negative.scatter_(1, classes.clamp(max=C - 1)[:, None], False)  # not of c (ignored pixels have no negatives)
    _push_negatives(queues, negative, rep_t)
    present = torch.nonzero(prototype_counts).flatten().tolist()
    if len(present) <= 1:  # a batch with at most one class has nothing to contrast
        return None
    anchor_order = torch.argsort(anchor_class, stable=True)  # anchor pixels grouped by class, in pixel order
    anchor_counts = torch.bincount(anchor_class, minlength=C + 1)[:C].tolist()
    anchor_starts = np.cumsum([0] + anchor_counts[:-1]).tolist()
    lengths = queues.length.tolist()
    anchors, negatives = {}, {}
    for c in present:  # the draws in the release's order: per class its anchors, then its negatives
        if anchor_counts[c] and lengths[c]:
            anchors[c] = anchor_starts[c] + torch.randint(anchor_counts[c], (num_queries,))
            negatives[c] = torch.randint(lengths[c], (num_queries * num_negatives,))
    if not anchors:
        return None
    return ContrastiveDraw(
        anchor_pixels=anchor_order.index_select(0, torch.cat(list(anchors.values())).to(anchor_order.device)),
        prototypes=F.normalize(prototypes[list(anchors)], dim=-1, eps=1e-8),
        negatives=[
            _unit_keys(queues, c, drawn, rep_t.dtype).reshape(num_queries, -1, D) for c, drawn in negatives.items()
        ],
        num_present=len(present),
    )


def release_label_onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C, h, w) bool: U2PL's ``label_onehot`` as ILM-ASSL releases it (``core/utils/utils.py:48-57``) for (B, h, w)
    class ids (ignore = any id >= ``num_classes``). Its ``scatter_(0, inputs.unsqueeze(1), 1.0)`` into a (C, B, h, w)
    tensor with a (B, 1, h, w) index writes every image's class into **batch slot 0**: slot 0 holds the union of the
    batch's classes at each pixel (an ignored pixel of another image counts as class 0, the id it is set to before the
    scatter), is cleared where image 0 is ignored, and every other slot is empty. With one image it is the one-hot."""
    ignored = labels >= num_classes
    slot_0 = torch.zeros(num_classes, *labels.shape[1:], dtype=torch.bool, device=labels.device)
    slot_0.scatter_(0, labels.masked_fill(ignored, 0).long(), True)  # slot_0[labels[b, y, x], y, x] for every b
    slot_0[:, ignored[0]] = False
    onehot = torch.zeros(len(labels), *slot_0.shape, dtype=torch.bool, device=labels.device)
    onehot[0] = slot_0
    return onehot


@torch.no_grad()
def contrastive_inputs(
    labels: torch.Tensor,
    pseudo_labels: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    entropy: torch.Tensor,
    size: Tuple[int, int],
    low_percent: float = 20.0,
    high_percent: float = 80.0,
    align_corners: bool = False,
    ignore: int = 255,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contrastive term's (labels, probabilities, low mask, high mask) at the representation's ``size``, formed
    from the step's full-resolution tensors as ILM-ASSL's ``train.py:574-582, 684-731`` forms them: the labelled
    images' ``labels`` then the unlabelled ``pseudo_labels`` resized by nearest neighbour (PyTorch's ``nearest``: row i
    reads row floor(i * in / out)); the teacher's ``teacher_logits`` (the labelled, then the unlabelled images,
    CutMixed at full resolution) resized bilinearly, then softmaxed; the anchor (low) and negative (high) candidate
    masks, nearest: every labelled pixel, and the kept unlabelled pixels at most / at least the ``low_percent`` /
    ``high_percent``-th percentile of their full-resolution ``entropy``.

    ``align_corners`` True is the release's: from 769 to 193 it reads the probabilities at full-resolution pixel 4i
    while the nearest labels come from pixel floor(3.984 i), up to 3 pixels away, so a pixel labelled c can rank c low
    (the release's negatives, :func:`draw_contrastive_samples_as_released`). False (ours) centres the bilinear samples.
    """
    kept_u = pseudo_labels != ignore
    low_u = (entropy <= percentile(entropy, low_percent)) & kept_u
    high_u = (entropy >= percentile(entropy, high_percent)) & kept_u
    kept_l = labels != ignore

    def small(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[:, None].float(), size=size, mode="nearest")[:, 0]

    all_labels = small(torch.cat([labels, pseudo_labels])).long()
    low, high = small(torch.cat([kept_l, low_u])).bool(), small(torch.cat([kept_l, high_u])).bool()
    # Each part resized on its own (their full-size concatenation would copy every logit), as one-channel maps:
    # the CPU kernel converts a many-channel input to channels-last first, five times the cost of the resize.
    small_logits = [
        F.interpolate(x.flatten(0, 1)[:, None], size=size, mode="bilinear", align_corners=align_corners).view(
            *x.shape[:2], *size
        )
        for x in teacher_logits
    ]
    return all_labels, torch.softmax(torch.cat(small_logits), 1), low, high


def _class_ranks(probs: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w): each class's rank at each pixel (0 = most probable) in the order of the release's descending
    ``torch.sort(prob, 1, True)`` (``loss_helper.py:76-83``), ties included."""
    order = torch.sort(probs, 1, True)[1]
    ranks = torch.arange(probs.shape[1], device=probs.device).view(1, -1, 1, 1).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


@torch.no_grad()
def draw_contrastive_samples_as_released(
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
) -> Optional[ContrastiveDraw]:
    """:func:`draw_contrastive_samples` as ILM-ASSL (U2PL's code) samples, ``core/utils/loss_helper.py:61-200`` with
    the one-hots of ``train.py:722-731``. Three differences from U2PL's paper (ours):

    * the labels are one-hots by :func:`release_label_onehot` of the labelled and of the unlabelled images: only the
      first image of each part has classes, the union of its part's (B7);
    * a negative of class c must *be* of c (``high_valid_pixel`` is the one-hot times the high mask): for an
      unlabelled pixel that the teacher ranks c at ``low_rank``..``high_rank`` - 1, which only happens where the
      labels and probabilities come from different pixels (:func:`contrastive_inputs`); a labelled negative also
      needs ``label_l[:, c] == 0`` and never exists (B8; U2PL issues #171, #27);
    * the i-th class with low-mask pixels (``valid_classes[i]``) gives the negatives' queue, but the anchors and the
      prototype come from class **i** (``seg_feat_low_entropy_list[i]``, ``seg_proto[i]``, loss_helper.py:173-200):
      the same class only while the classes present are 0..i (U2PL issue #111, acknowledged, not fixed). The loss
      is still averaged over the number of classes present.

    The random draws are the release's, in its order: per i, its anchors, then its negatives (CPU generator)."""
    C, D = probs.shape[1], rep_teacher.shape[1]
    onehot = torch.cat([release_label_onehot(labels[:num_labelled], C), release_label_onehot(labels[num_labelled:], C)])
    low_valid = onehot & low_mask.bool()[:, None]
    high_valid = onehot & high_mask.bool()[:, None]
    ranks = _class_ranks(probs)
    class_mask = torch.cat(
        [
            (ranks[:num_labelled] < low_rank) & ~onehot[:num_labelled],
            (ranks[num_labelled:] >= low_rank) & (ranks[num_labelled:] < high_rank),
        ]
    )
    negative = (probs < negative_threshold) & high_valid & class_mask

    def per_pixel(x: torch.Tensor) -> torch.Tensor:  # (N pixels in (image, y, x) order, C), as mask indexing reads
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    rep_t = per_pixel(rep_teacher.detach())
    _push_negatives(queues, per_pixel(negative), rep_t)
    low_pixels = per_pixel(low_valid)
    prototype_counts = low_pixels.sum(0)
    present = torch.nonzero(prototype_counts).flatten().tolist()
    if len(present) <= 1:  # loss_helper.py:155-161
        return None
    # A pixel of slot 0 can be of several classes: each class's mean teacher feature over its own low-mask pixels.
    prototypes = (low_pixels.T.to(rep_t.dtype) @ rep_t) / prototype_counts.clamp(min=1)[:, None].to(rep_t.dtype)
    # Every (class, pixel) anchor pair at once, grouped by class and in pixel order within each (one host sync).
    anchor_classes, anchor_candidates = torch.nonzero(
        ((probs > class_threshold) & low_valid).transpose(0, 1).reshape(C, -1), as_tuple=True
    )
    anchor_counts = torch.bincount(anchor_classes, minlength=C).tolist()
    anchor_starts = np.cumsum([0] + anchor_counts[:-1]).tolist()
    lengths = queues.length.tolist()
    anchors, prototype_classes, negatives = [], [], []
    for i, queue_class in enumerate(present):  # class i's anchors and prototype, the i-th present class's queue
        if anchor_counts[i] and lengths[queue_class]:
            drawn = anchor_starts[i] + torch.randint(anchor_counts[i], (num_queries,))
            anchors.append(anchor_candidates.index_select(0, drawn.to(anchor_candidates.device)))
            drawn = torch.randint(lengths[queue_class], (num_queries * num_negatives,))
            negatives.append(_unit_keys(queues, queue_class, drawn, rep_t.dtype).reshape(num_queries, -1, D))
            prototype_classes.append(i)
    if not anchors:
        return None
    return ContrastiveDraw(
        anchor_pixels=torch.cat(anchors),
        prototypes=F.normalize(prototypes[prototype_classes], dim=-1, eps=1e-8),
        negatives=negatives,
        num_present=len(present),
    )


def _unit_keys(queues: ContrastQueues, c: int, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Class ``c``'s keys at queue ``positions``, as unit vectors in ``dtype``. Normalising the queue's rows once costs
    less than normalising every drawn copy; index_select is several times faster than advanced indexing on the CPU."""
    keys, start = queues.storage(c)
    rows = (positions.to(keys.device) + start) % len(keys)
    return F.normalize(keys.to(dtype), dim=-1, eps=1e-8).index_select(0, rows)


def info_nce_loss(rep: torch.Tensor, draw: Optional[ContrastiveDraw], temperature: float = 0.5) -> torch.Tensor:
    """U2PL's InfoNCE on the student's (B, D, h, w) representation ``rep`` for the anchors, prototypes and negatives
    of ``draw``: per class the mean over its anchors of the cross-entropy of (prototype, negatives) cosine
    similarities / ``temperature`` with the prototype as target, summed and divided by ``draw.num_present``."""
    loss = rep.sum() * 0.0
    if draw is None:
        return loss
    rep_p = rep.permute(0, 2, 3, 1).reshape(-1, rep.shape[1])
    # all anchors gathered at once (one scatter in the backward)
    anchors = F.normalize(rep_p.index_select(0, draw.anchor_pixels), dim=-1, eps=1e-8)
    for anchor, prototype, negative in zip(
        anchors.split(len(anchors) // len(draw.negatives)), draw.prototypes, draw.negatives
    ):
        positive = anchor @ prototype.to(anchor.dtype)
        negatives = torch.bmm(negative.to(anchor.dtype), anchor[:, :, None])[:, :, 0]
        target = torch.zeros(len(anchor), dtype=torch.long, device=rep.device)
        loss = loss + F.cross_entropy(torch.cat([positive[:, None], negatives], 1) / temperature, target)
    return loss / draw.num_present
