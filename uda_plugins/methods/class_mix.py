"""DACS ClassMix: paste the pixels of half of a source image's classes onto a target image.

Follows lhoyer/MIC ``seg/mmseg/models/utils/dacs_transforms.py`` (``get_class_masks``, ``generate_class_mask``,
``one_mix``) with one deliberate fix: the reference draws the classes from ``torch.unique`` of the *whole source
batch* (ignore label included) for every image, so an image may get few or none of its own classes and the
ignore "class" can be pasted. By default the classes come from each image's own labelled pixels (the DACS
paper's rule); ``UDA.MIX.CLASSES_FROM_BATCH`` reproduces the reference.
"""

from __future__ import annotations

import torch

__all__ = ["class_mix_masks", "mix"]


def class_mix_masks(labels: torch.Tensor, ignore_label: int = 255, classes_from_batch: bool = False) -> torch.Tensor:
    """(N, H, W) source labels -> (N, H, W) float masks, 1 where the pixel's class was chosen for pasting:
    ``ceil(n / 2)`` of the ``n`` candidate classes, uniformly without replacement (torch's global RNG)."""
    masks = []
    batch_classes = torch.unique(labels)
    for label in labels:
        if classes_from_batch:
            classes = batch_classes
        else:
            classes = torch.unique(label)
            classes = classes[classes != ignore_label]
        n = classes.numel()
        chosen = classes[torch.randperm(n, device="cpu")[: (n + n % 2) // 2].to(classes.device)]
        masks.append(torch.isin(label, chosen))
    return torch.stack(masks).float()


def mix(mask: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """``mask * foreground + (1 - mask) * background``; ``mask`` (N, H, W) broadcasts over image channels."""
    if foreground.dim() == mask.dim() + 1:
        mask = mask[:, None]
    return mask * foreground + (1 - mask) * background
