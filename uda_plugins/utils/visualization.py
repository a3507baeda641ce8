"""Pictures for TensorBoard and reports: colourised label maps, side-by-side panels, bar and line charts."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["default_palette", "palette_for_dataset", "colorize", "panel", "iou_bar_chart", "line_chart"]


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


def iou_bar_chart(class_names: Sequence[str], ious: Sequence[float], palette: np.ndarray) -> torch.Tensor:
    """A horizontal bar chart of per-class IoU (0-100; NaN = the class is absent from the evaluation set) as a
    (3, H, W) uint8 image: one row per class with its name, a bar in the class's colour and the value."""
    import cv2

    row, name_w, bar_w, pad = 18, 120, 300, 6
    height, width = row * (len(class_names) + 1) + pad, name_w + bar_w + 60
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    for k in (0, 50, 100):  # grid lines at 0, 50 and 100
        x = name_w + k * bar_w // 100
        cv2.line(image, (x, pad), (x, height - row), (220, 220, 220), 1)
        cv2.putText(image, str(k), (x - 6, height - 4), font, scale, (90, 90, 90), 1, cv2.LINE_AA)
    for i, (name, iou) in enumerate(zip(class_names, ious)):
        y = pad + i * row
        cv2.putText(image, str(name)[:16], (4, y + row - 5), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
        if iou != iou:  # NaN
            cv2.putText(image, "n/a", (name_w + 4, y + row - 5), font, scale, (150, 150, 150), 1, cv2.LINE_AA)
            continue
        length = int(round(max(0.0, min(100.0, float(iou))) * bar_w / 100))
        color = tuple(int(c) for c in palette[i]) if i < len(palette) else (100, 100, 100)
        cv2.rectangle(image, (name_w, y + 3), (name_w + max(length, 1), y + row - 3), color, -1)
        cv2.rectangle(image, (name_w, y + 3), (name_w + max(length, 1), y + row - 3), (60, 60, 60), 1)
        cv2.putText(image, f"{iou:.1f}", (name_w + length + 4, y + row - 5), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def line_chart(
    series: Dict[str, Tuple[Sequence[float], Sequence[float], Sequence[float]]],
    x_label: str,
    y_label: str,
    size: Tuple[int, int] = (360, 560),
) -> np.ndarray:
    """A line chart (H, W, 3 uint8, RGB) of ``series``: name -> (x values, means, standard deviations), each point
    with an error bar, a legend in the corner; axes span the data with a margin."""
    import cv2

    height, width = size
    left, right, top, bottom = 56, 16, 16, 44
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    xs = [x for xv, _, _ in series.values() for x in xv]
    ys = [m + s for _, mv, sv in series.values() for m, s in zip(mv, sv)]
    ys += [m - s for _, mv, sv in series.values() for m, s in zip(mv, sv)]
    x0, x1 = min(xs), max(xs)
    y0, y1 = np.floor(min(ys) - 1), np.ceil(max(ys) + 1)
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x: float, y: float) -> Tuple[int, int]:
        u = left + (x - x0) / (x1 - x0) * (width - left - right)
        v = top + (y1 - y) / (y1 - y0) * (height - top - bottom)
        return int(round(u)), int(round(v))

    cv2.rectangle(image, (left, top), (width - right, height - bottom), (120, 120, 120), 1)
    for y in np.linspace(y0, y1, 5):
        u, v = px(x0, y)
        cv2.line(image, (left, v), (width - right, v), (230, 230, 230), 1)
        cv2.putText(image, f"{y:.1f}", (4, v + 4), font, scale, (60, 60, 60), 1, cv2.LINE_AA)
    for x in sorted(set(xs)):
        u, _ = px(x, y0)
        cv2.putText(image, f"{x:g}", (u - 8, height - bottom + 16), font, scale, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.putText(image, x_label, (left, height - 8), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, y_label, (left + 4, top + 14), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    for k, (name, (xv, mv, sv)) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        points = [px(x, m) for x, m in zip(xv, mv)]
        for a, b in zip(points, points[1:]):
            cv2.line(image, a, b, colour, 2, cv2.LINE_AA)
        for x, m, s in zip(xv, mv, sv):
            (u, v), (_, lo), (_, hi) = px(x, m), px(x, m - s), px(x, m + s)
            cv2.line(image, (u, lo), (u, hi), colour, 1, cv2.LINE_AA)
            cv2.circle(image, (u, v), 3, colour, -1, cv2.LINE_AA)
        legend_y = height - bottom - 12 - 16 * k
        cv2.line(image, (width - right - 150, legend_y - 4), (width - right - 130, legend_y - 4), colour, 2)
        cv2.putText(image, name, (width - right - 124, legend_y), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return image
