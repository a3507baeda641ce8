"""Pictures for TensorBoard: colourised label maps and side-by-side panels."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["default_palette", "palette_for_dataset", "colorize", "panel"]


def default_palette(num_classes: int) -> np.ndarray:
    """A fixed, distinct colour per class (Cityscapes colours for 19 classes); ignore (255) is black."""
    from uda_plugins.data.labels import CITYSCAPES_19, MTAF_7, palette

    if num_classes == CITYSCAPES_19.num_classes:
        return palette(CITYSCAPES_19)
    if num_classes == MTAF_7.num_classes:
        return palette(MTAF_7)
    rng = np.random.default_rng(0)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:num_classes] = rng.integers(0, 256, (num_classes, 3))
    return table


def palette_for_dataset(dataset_name: Optional[str], num_classes: int) -> np.ndarray:
    """The dataset's ``stuff_colors`` from its metadata, else :func:`default_palette`."""
    from uda_plugins.d2 import MetadataCatalog

    if dataset_name:
        colors = MetadataCatalog.get(dataset_name).get("stuff_colors")
        if colors and len(colors) == num_classes:
            table = np.zeros((256, 3), dtype=np.uint8)
            table[:num_classes] = np.asarray(colors, dtype=np.uint8)
            return table
    return default_palette(num_classes)


def colorize(label: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """(H, W) class map -> (3, H, W) uint8 colour image."""
    table = torch.from_numpy(palette).to(label.device)
    return table[label.long().clamp(0, 255)].permute(2, 0, 1).contiguous()


def panel(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Place (3, H, W) uint8 images side by side (resized to the first one's height by nearest sampling)."""
    h = images[0].shape[-2]
    out = []
    for im in images:
        im = im.to(torch.uint8).cpu()
        if im.shape[-2] != h:
            w = round(im.shape[-1] * h / im.shape[-2])
            im = torch.nn.functional.interpolate(im[None].float(), size=(h, w), mode="nearest")[0].to(torch.uint8)
        out.append(im)
    return torch.cat(out, dim=-1)
