"""Whole-image and sliding-window inference, Detectron2's ``SemanticSegmentor`` output contract:
``[{"sem_seg": logits (C, height, width)}]`` at each input's original size; and the probabilities of a network on
every image of a full-view loader (:func:`predict_full_views`: pseudo-label banks, active-learning scores)."""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .losses import upsample_like
from .segmentor import Segmentor, size_groups, stack_images

__all__ = [
    "class_maximum",
    "predicted_classes",
    "whole_inference",
    "slide_inference",
    "slide_windows",
    "clamp_crop_size",
    "segment",
    "predict_full_views",
    "squashed_logits",
]


def class_maximum(scores: torch.Tensor, dim: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """``scores.max(dim)``: the maximum along the class dimension and its index (the first on ties). On the CPU,
    ``max`` with indices over the channels of an (N, C, H, W) tensor is a slow strided reduction (2.7 ms for a 4 x 19
    x 96 x 192 batch on 2 cores); the maximum alone is vectorised, so there the index is found as the highest of
    ``C - c`` over the classes c that reach it (0.6 ms). A NaN maximum (no class reaches it) gives class C - 1."""
    num_classes = scores.shape[dim]
    if scores.device.type != "cpu" or num_classes > 255:
        return scores.max(dim=dim)
    values = scores.amax(dim, keepdim=True)
    shape = [1] * scores.dim()
    shape[dim] = num_classes
    rank = torch.arange(num_classes, 0, -1, dtype=torch.uint8, device=scores.device).view(shape)  # class 0 highest
    first = ((scores == values) * rank).amax(dim).clamp_(min=1)
    return values.squeeze(dim), num_classes - first.long()


def predicted_classes(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The class of each pixel: the index of the maximum of ``scores`` along the class dimension ``dim`` (the first
    on ties), as ``argmax(dim)`` (:func:`class_maximum`: on the CPU, several times faster on full-size maps)."""
    return class_maximum(scores, dim)[1]


# A box (y1, y2, x1, x2) in pixels, end-exclusive (the order of HRDA's reference code).
Box = Tuple[int, int, int, int]


def clamp_crop_size(crop_size: Sequence[int], height: int, width: int) -> Tuple[int, int]:
    """``crop_size`` (h, w) limited to the image; a non-positive entry means the whole extent."""
    ch, cw = int(crop_size[0]), int(crop_size[1])
    return (min(ch, height) if ch > 0 else height, min(cw, width) if cw > 0 else width)


def slide_windows(height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]) -> List[Box]:
    """Windows of ``crop_size`` every ``stride``, the last one shifted back inside the image (mmseg's slide
    grid, as ``extract_slide_feat``); they cover the image."""
    ch, cw = clamp_crop_size(crop_size, height, width)
    sh, sw = max(int(stride[0]), 1), max(int(stride[1]), 1)
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def whole_inference(net: Segmentor, x: torch.Tensor) -> torch.Tensor:
    """Logits at the input resolution for a normalised batch (``net.predict``; a plain module's output is
    upsampled)."""
    if hasattr(net, "predict"):
        return net.predict(x)
    return upsample_like(net(x), x.shape[-2:])


def slide_inference(
    net: Segmentor, x: torch.Tensor, crop: Sequence[int], stride: Sequence[int], windows_per_batch: int
) -> torch.Tensor:
    """Average the logits of overlapping ``crop`` windows placed every ``stride`` (mmseg's slide mode; windows
    are clamped to the image and run ``windows_per_batch`` at a time)."""
    n, _, h, w = x.shape
    boxes = slide_windows(h, w, crop, stride)
    logits = None
    count = x.new_zeros((1, 1, h, w))
    for i in range(0, len(boxes), windows_per_batch):
        chunk = boxes[i : i + windows_per_batch]
        crops = torch.cat([x[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in chunk])
        out = whole_inference(net, crops)
        if logits is None:
            logits = x.new_zeros((n, out.shape[1], h, w))
        for j, (y0, y1, x0, x1) in enumerate(chunk):
            logits[:, :, y0:y1, x0:x1] += out[j * n : (j + 1) * n]
            count[:, :, y0:y1, x0:x1] += 1
    return logits / count


def segment(
    net: Segmentor,
    batched_inputs: List[dict],
    mode: str = "whole",
    crop=(512, 512),
    stride=(341, 341),
    windows_per_batch: int = 4,
) -> List[Dict[str, torch.Tensor]]:
    """Predict every input dict (``image`` uint8 CHW, optional ``height``/``width``) and return logits resized
    to (height, width); a dict that carries ``sem_seg_at_input`` (``TEST.EVAL_RESOLUTION input``) also gets its
    logits at the input size, under the same key."""
    results = []
    for d in batched_inputs:
        x = net.normalize(d["image"][None])
        if mode == "whole":
            logits = whole_inference(net, x)
        elif mode == "slide":
            logits = slide_inference(net, x, crop, stride, windows_per_batch)
        else:
            raise ValueError(f"Unknown TEST.MODE '{mode}' (whole or slide)")
        result = {"sem_seg_at_input": logits[0]} if "sem_seg_at_input" in d else {}
        height, width = d.get("height", logits.shape[-2]), d.get("width", logits.shape[-1])
        if (height, width) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        results.append({"sem_seg": logits[0], **result})
    return results


def squashed_logits(network: nn.Module, images: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
    """ILM-ASSL's scoring forward (``core/active_learning/Semi-sup_active_pu.py:58-70``): the normalised ``images``
    resized to ``input_size`` whatever their aspect ratio, bilinearly with ``align_corners=True``, and the network's
    logits (at its output stride) resized to the images' size alike."""
    x = F.interpolate(images, size=tuple(int(v) for v in input_size), mode="bilinear", align_corners=True)
    return F.interpolate(network(x), size=images.shape[-2:], mode="bilinear", align_corners=True)


@torch.no_grad()
def predict_full_views(
    network: nn.Module, loader, normalize, input_size: Optional[Sequence[int]] = None
) -> Iterator[Tuple[List[int], torch.Tensor]]:
    """(dataset indices, softmax probabilities (N, C, H, W)) of each batch of a full-view loader (split into
    groups of one image size), ``network`` in eval mode (its mode is restored). ``input_size`` (h, w): the network
    sees each image squashed to it (:func:`squashed_logits`, ``UDA.ACTIVE.SCORE_INPUT_SIZE``)."""
    squash = input_size is not None and min(input_size) > 0
    was_training = network.training
    network.eval()
    try:
        for batch in loader:
            for dicts in size_groups(batch):
                device = next(network.parameters()).device
                images = normalize(stack_images(dicts, device))
                logits = squashed_logits(network, images, input_size) if squash else network.predict(images)
                yield [d["dataset_index"] for d in dicts], torch.softmax(logits.float(), dim=1)
    finally:
        network.train(was_training)
