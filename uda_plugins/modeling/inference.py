"""Whole-image and sliding-window inference, Detectron2's ``SemanticSegmentor`` output contract:
``[{"sem_seg": logits (C, height, width)}]`` at each input's original size."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from .losses import upsample_like
from .segmentor import Segmentor

__all__ = ["whole_inference", "slide_inference", "segment"]


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
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh + ch, h), min(c * sw + cw, w)
            boxes.append((max(y1 - ch, 0), max(x1 - cw, 0), y1, x1))
    logits = None
    count = x.new_zeros((1, 1, h, w))
    for i in range(0, len(boxes), windows_per_batch):
        chunk = boxes[i : i + windows_per_batch]
        crops = torch.cat([x[:, :, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])
        out = whole_inference(net, crops)
        if logits is None:
            logits = x.new_zeros((n, out.shape[1], h, w))
        for j, (y0, x0, y1, x1) in enumerate(chunk):
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
    to (height, width)."""
    results = []
    for d in batched_inputs:
        x = net.normalize(d["image"][None])
        if mode == "whole":
            logits = whole_inference(net, x)
        elif mode == "slide":
            logits = slide_inference(net, x, crop, stride, windows_per_batch)
        else:
            raise ValueError(f"Unknown TEST.MODE '{mode}' (whole or slide)")
        height, width = d.get("height", logits.shape[-2]), d.get("width", logits.shape[-1])
        if (height, width) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        results.append({"sem_seg": logits[0]})
    return results
