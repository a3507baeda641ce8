"""HRDA's multi-resolution segmentor (Hoyer et al., ECCV 2022): a low-resolution *context* view of the whole crop and
a full-resolution *detail* crop share one encoder and one decode head; a learned scale attention fuses them.

Follows lhoyer/MIC@2f932a9 ``seg/mmseg/models/segmentors/hrda_encoder_decoder.py`` (``HRDAEncoderDecoder``,
``get_crop_bbox``), ``seg/mmseg/models/decode_heads/hrda_head.py`` (``HRDAHead``) and the values of
``seg/configs/mic/gtaHR2csHR_mic_hrda.py`` / ``seg/experiments.py`` (``hrda1-512-0.1``), which are the
``MODEL.HRDA`` defaults.

Training (``forward_train``), for normalised images ``x`` of a training crop:

* context = ``x`` bilinearly resized by ``SCALES[0]`` (0.5); detail = ``x`` (``SCALES[1]`` must be 1) cropped to one
  random box per batch of ``HR_CROP_SIZE`` whose offsets are multiples of ``CROP_COORD_DIVISIBLE``;
* both go through the **same** backbone (two calls, so BatchNorm sees each view's own statistics, as the reference)
  and the **same** decode head. docs/methods.md §1.5 says "per-scale decoder"; the reference builds one
  ``self.head`` in ``HRDAHead.__init__`` and calls it for both ``lr_seg`` and ``hr_seg`` in ``forward``, so the
  head is shared here;
* scale attention ``a = sigmoid(A(context features))``, ``A`` a second head with its own weights (``HRDAHead``
  builds ``scale_attention`` from the same head config): for ``DAFormerHead`` its embeddings and fusion are
  ``ATTENTION_EMBED_DIM`` wide and the ASPP fusion is replaced by a 1x1 conv + norm + ReLU — which is exactly
  ``SegFormerHead`` — for ``DeepLabV2Head`` it is a ``DeepLabV2Head``. It has one output per class
  (``ATTENTION_CLASSWISE``) or one. Any other head gets a copy of itself with ``EMBED_DIM = ATTENTION_EMBED_DIM``
  (the reference raises ``NotImplementedError`` there);
* ``a`` is zeroed outside the detail box (at the context logits' grid, box / (stride / context scale), truncated
  as the reference's ``scale_box``: with DLV2's stride 8 and CROP_COORD_DIVISIBLE 8 the mask edge can fall half a
  context cell early, as in the reference), then ``fused = up(a) * HR_inserted + up((1 - a) * LR)``, ``HR_inserted`` =
  the detail logits placed at the box on the full-resolution logit grid and 0 elsewhere, ``up`` bilinear to that
  grid. So outside the box (beyond one bilinear cell) the fused logits are the upsampled context logits;
* loss = ``(1 - LR_LOSS_WEIGHT - HR_LOSS_WEIGHT) * CE(fused, y) + HR_LOSS_WEIGHT * CE(HR, y[box]) +
  LR_LOSS_WEIGHT * CE(LR, y)``, each CE mmseg's (logits resized to the label, mean over all pixels).

Inference (``predict`` / ``forward``; the teacher's pseudo-labels): the context is the whole resized image; the
detail logits come from ``HR_CROP_SIZE`` windows slid with stride ``HR_CROP_SIZE // 2`` (``hr_slide_overlapping``,
default True; stride = crop when False) over the full-resolution image, **all windows in one backbone and one head
call** (``extract_slide_feat`` concatenates them; batching matters because the teacher's BatchNorm runs in train
mode) and averaged where they overlap; the attention is not masked. The reference's test config then slides
1024x1024 windows with stride 512 over the full image (``test_cfg=dict(mode='slide', batched_slide=True, ...)``),
each window being one ``predict`` here: that is ``TEST.*``, not this module.

Other decisions:

* ``SegmentorOutput.features`` are the encoder outputs of the view at ``FEATURE_SCALE`` (0.5: the context view,
  "LR features for the Feature Distance as in the original DAFormer"), so a frozen encoder run on ``x`` resized
  by ``feature_scale`` matches them. ``extract_features`` stays the plain (unscaled) backbone. The reference's
  ``feature_scale='all'`` (FD on both scales via a class-level crop-box dict) is not supported. If FEATURE_SCALE
  is the detail scale, the features are those of the detail crop (as the reference), not of the whole ``x``.
* The crop box is returned in ``extras["detail_box"]`` as ``(y1, y2, x1, x2)`` (the reference's order) and can be
  passed back to ``forward_train(x, detail_box=...)`` (Guidance Training runs two passes with one box). The
  reference keeps it as module state (``set_hr_crop_box`` / ``last_train_crop_box``); this module keeps none, so
  a deep-copied teacher or a second pass cannot see a stale box.
* The box is drawn with torch's global RNG (the trainer seeds it per iteration); the reference uses numpy's.
  It is drawn only when the crop is smaller than the image (as ``get_crop_bbox``), height offset first.
* Fixed reference bugs, reproducible with a flag: the offset range ``randint(0, (margin + 1) // divisible)``
  never reaches the last aligned offset (``REFERENCE_CROP_OFFSETS``) and raises when a margin is below
  ``divisible - 1`` (e.g. 0 in one dimension only; here offset 0 is used);
  the LR loss is computed on the attention-weighted ``(1 - a) * LR`` because ``forward`` reuses the name
  ``lr_seg`` (``LR_LOSS_ON_ATTENDED_LOGITS``; irrelevant at the default ``LR_LOSS_WEIGHT = 0``).
* Generic sizes: ``HR_CROP_SIZE`` larger than the image is clamped to it (the reference's ``get_crop_bbox`` would
  return an out-of-range box); the output stride is the head's ``common_stride`` (the reference hard-codes 4 for
  DAFormer and 8 for DLV2); input sizes, HR_CROP_SIZE, its half (overlapping slide) and CROP_COORD_DIVISIBLE must
  be multiples of it, so that the detail logits fit the box exactly (checked, with an error naming the key).
  Feature maps are resized to explicit sizes
  instead of by ``scale_factor``, which is the same for the power-of-two sizes of the reference.
* The attention head is named ``scale_attention_head`` so that SOLVER.HEAD_LR_MULTIPLIER (names containing
  "head") applies to it, as mmcv's ``custom_keys=dict(head=...)`` does to the reference's
  ``decode_head.scale_attention``.
* ``experiments.py`` sets ``lr_loss_weight = hr_loss_weight`` when the detail crop equals the training crop (no
  region is supervised by the context alone); that is a config choice, left to the configs here.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from uda_plugins.d2 import SEM_SEG_HEADS_REGISTRY, CfgNode

from .inference import Box, clamp_crop_size, slide_windows
from .losses import seg_cross_entropy, upsample_like
from .segmentor import Segmentor, SegmentorOutput, View, levels_read_by

__all__ = [
    "HRDASegmentor",
    "Box",
    "get_crop_box",
    "crop",
    "scale_box",
    "slide_windows",
    "build_scale_attention_head",
]


def get_crop_box(
    height: int, width: int, crop_size: Sequence[int], divisible: int = 1, reference_offsets: bool = False
) -> Box:
    """A random box of ``crop_size`` (clamped to the image) with offsets that are multiples of ``divisible``, drawn
    with torch's global RNG (lhoyer/MIC ``hrda_encoder_decoder.py`` ``get_crop_bbox``).

    ``reference_offsets`` reproduces the reference's range ``randint(0, (margin + 1) // divisible)``, which misses
    the last aligned offset when ``divisible > 1``; by default every multiple of ``divisible`` in [0, margin]."""
    ch, cw = clamp_crop_size(crop_size, height, width)
    if (ch, cw) == (height, width):
        return (0, height, 0, width)  # no draw, as the reference

    def offset(margin: int) -> int:
        choices = (margin + 1) // divisible if reference_offsets else margin // divisible + 1
        return int(torch.randint(0, max(choices, 1), (1,)).item()) * divisible

    y1 = offset(height - ch)
    x1 = offset(width - cw)
    return (y1, y1 + ch, x1, x1 + cw)


def crop(t: torch.Tensor, box: Box) -> torch.Tensor:
    """The ``box`` region of the last two dimensions of ``t``."""
    y1, y2, x1, x2 = box
    return t[..., y1:y2, x1:x2]


def scale_box(box: Box, scale: float) -> Box:
    """``box`` divided by ``scale`` and truncated (the reference's ``scale_box``)."""
    return tuple(int(v / scale) for v in box)  # type: ignore[return-value]


def build_scale_attention_head(cfg: CfgNode, input_shape: dict) -> nn.Module:
    """The scale-attention head for the decode head ``cfg`` names (see the module docstring; ``HRDAHead.__init__``
    ``attn_cfg``)."""
    h = cfg.MODEL.HRDA
    attn_cfg = cfg.clone()
    attn_cfg.defrost()
    head = attn_cfg.MODEL.SEM_SEG_HEAD
    name = head.NAME
    if name == "DAFormerHead":
        # DAFormer with fusion_cfg=dict(type='conv', kernel_size=1, ReLU, norm) is SegFormer's all-MLP head.
        name = "SegFormerHead"
    head.EMBED_DIM = h.ATTENTION_EMBED_DIM  # unused by DeepLabV2Head, whose reference attention has no width
    if not h.ATTENTION_CLASSWISE:
        head.NUM_CLASSES = 1
    return SEM_SEG_HEADS_REGISTRY.get(name)(attn_cfg, input_shape)


class HRDASegmentor(Segmentor):
    """Context + detail views through a shared backbone and decode head, fused by a learned scale attention."""

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__(cfg)
        h = cfg.MODEL.HRDA
        if len(h.SCALES) != 2:
            raise ValueError(f"MODEL.HRDA.SCALES must be (context, detail), got {tuple(h.SCALES)}")
        self.lr_scale, self.hr_scale = sorted(float(s) for s in h.SCALES)  # the reference sorts them ascending
        if self.hr_scale != 1.0:
            raise ValueError(
                f"MODEL.HRDA.SCALES: the detail scale must be 1.0 (the label is cropped with the detail box), "
                f"got {tuple(h.SCALES)}"
            )
        if float(h.FEATURE_SCALE) not in (self.lr_scale, self.hr_scale):
            raise ValueError(f"MODEL.HRDA.FEATURE_SCALE {h.FEATURE_SCALE} must be one of SCALES {tuple(h.SCALES)}")
        self.feature_scale = float(h.FEATURE_SCALE)
        self.output_stride: int = int(self.head.common_stride)
        self.hr_crop_size = (int(h.HR_CROP_SIZE[0]), int(h.HR_CROP_SIZE[1]))
        self.crop_coord_divisible = int(h.CROP_COORD_DIVISIBLE)
        self.hr_slide_inference = bool(h.HR_SLIDE_INFERENCE)
        self.hr_slide_overlapping = bool(h.HR_SLIDE_OVERLAPPING)
        self._check_alignment()
        self.hr_loss_weight = float(h.HR_LOSS_WEIGHT)
        self.lr_loss_weight = float(h.LR_LOSS_WEIGHT)
        self.blur_hr_crop = bool(h.BLUR_HR_CROP)
        self.reference_crop_offsets = bool(h.REFERENCE_CROP_OFFSETS)
        self.lr_loss_on_attended_logits = bool(h.LR_LOSS_ON_ATTENDED_LOGITS)
        self.fixed_attention: Optional[float] = float(h.FIXED_ATTENTION) if h.FIXED_ATTENTION >= 0 else None
        self.scale_attention_head = (
            build_scale_attention_head(cfg, self.backbone.output_shape()) if self.fixed_attention is None else None
        )

    def _check_alignment(self) -> None:
        # The detail logits are inserted at box / stride on the fused grid: offsets, crop and slide stride must
        # be whole numbers of logit cells, or the insertion does not fit.
        os = self.output_stride
        if self.crop_coord_divisible % os:
            raise ValueError(
                f"MODEL.HRDA.CROP_COORD_DIVISIBLE ({self.crop_coord_divisible}) must be a multiple of the decode "
                f"head's output stride ({os})"
            )
        for size in self.hr_crop_size:
            if size > 0 and (size % os or (self.hr_slide_overlapping and (size // 2) % os)):
                raise ValueError(
                    f"MODEL.HRDA.HR_CROP_SIZE {self.hr_crop_size}: sizes (and half of them for overlapping slide "
                    f"inference) must be multiples of the decode head's output stride ({os})"
                )

    def networks(self) -> List[nn.Module]:
        attention = [self.scale_attention_head] if self.scale_attention_head is not None else []
        return super().networks() + attention

    def _check_input(self, x: torch.Tensor) -> None:
        height, width = x.shape[-2:]
        if height % self.output_stride or width % self.output_stride:
            raise ValueError(
                f"HRDA needs input sizes divisible by the output stride {self.output_stride}, got {height}x{width}"
            )

    # ------------------------------------------------------------------ views
    def _rescale(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        if scale == 1.0:
            return x
        # mmseg's resize(scale_factor=s, bilinear, align_corners=False), no antialiasing.
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)

    def _detail_view(self, x: torch.Tensor) -> torch.Tensor:
        if not self.blur_hr_crop:
            return self._rescale(x, self.hr_scale)
        return upsample_like(self._rescale(x, 0.5), x.shape[-2:])  # ``blur_downup``

    def _attention(self, lr_features: Dict[str, torch.Tensor], lr_logits: torch.Tensor) -> torch.Tensor:
        """(N, C or 1, h, w) attention on the context logit grid."""
        if self.scale_attention_head is None:
            return lr_logits.new_full((lr_logits.shape[0], 1, *lr_logits.shape[-2:]), self.fixed_attention)
        return torch.sigmoid(self.scale_attention_head(lr_features))

    def fuse(
        self,
        lr_logits: torch.Tensor,
        hr_logits: torch.Tensor,
        attention: torch.Tensor,
        box: Optional[Box] = None,
        size: Optional[Sequence[int]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(fused, attention)``: ``up(a) * HR_inserted + up((1 - a) * LR)`` on the detail logit grid ``size``
        (default: that of ``hr_logits``), where ``a`` is ``attention`` zeroed outside ``box`` (detail-image pixels;
        None = the detail logits cover the image). The returned attention is the masked one, on the context grid
        (``HRDAHead.forward``)."""
        os = self.output_stride
        size = tuple(hr_logits.shape[-2:]) if size is None else tuple(size)
        if box is not None:
            mask = attention.new_zeros((attention.shape[0], 1, *attention.shape[-2:]))
            y1, y2, x1, x2 = scale_box(box, os / self.lr_scale)
            mask[:, :, y1:y2, x1:x2] = 1
            attention = attention * mask
        up_lr = upsample_like((1 - attention) * lr_logits, size)
        if box is None:
            inserted = hr_logits
        else:
            y1, y2, x1, x2 = scale_box(box, os)
            inserted = up_lr.new_zeros(up_lr.shape)
            inserted[:, :, y1:y2, x1:x2] = hr_logits
        return upsample_like(attention, size) * inserted + up_lr, attention

    # ------------------------------------------------------------------ training
    def forward_train(self, x: torch.Tensor, detail_box: Optional[Box] = None) -> SegmentorOutput:
        """Fused logits on the full-resolution logit grid; ``extras``: ``detail_box`` (drawn when None),
        ``lr_logits`` (context grid), ``hr_logits`` (detail box), ``attention`` (masked, context grid)."""
        self._check_input(x)
        lr_features = self.extract_features(self._rescale(x, self.lr_scale))
        hr_image = self._detail_view(x)
        height, width = hr_image.shape[-2:]
        if detail_box is None:
            detail_box = get_crop_box(
                height, width, self.hr_crop_size, self.crop_coord_divisible, self.reference_crop_offsets
            )
        detail_box = self._checked_box(detail_box, height, width)
        hr_features = self.extract_features(crop(hr_image, detail_box))
        grid = (height // self.output_stride, width // self.output_stride)
        return self._decode_scales(lr_features, hr_features, detail_box, grid)

    def _decode_scales(
        self, lr_features: Dict[str, torch.Tensor], hr_features: Dict[str, torch.Tensor], box: Box, grid
    ) -> SegmentorOutput:
        lr_logits = self.decode(lr_features)
        hr_logits = self.decode(hr_features)
        fused, attention = self.fuse(lr_logits, hr_logits, self._attention(lr_features, lr_logits), box, grid)
        features = lr_features if self.feature_scale == self.lr_scale else hr_features
        extras = {
            "detail_box": box,
            "lr_logits": lr_logits,
            "hr_logits": hr_logits,
            "attention": attention,
            "lr_features": lr_features,
            "hr_features": hr_features,
        }
        return SegmentorOutput(fused, features, extras)

    def views(self, output: SegmentorOutput) -> List[View]:
        """The context view (whole image at the context scale) and the detail view (the detail box at scale 1)."""
        extras = output.extras
        return [
            View(extras["lr_features"], self.lr_scale),
            View(extras["hr_features"], self.hr_scale, extras["detail_box"]),
        ]

    def decode_views(self, features: Sequence[Dict[str, torch.Tensor]], output: SegmentorOutput) -> SegmentorOutput:
        """Replacement (context, detail) features decoded and fused as in training, with ``output``'s detail box;
        the scale attention is computed from the replacement context features (``HRDAHead.forward``)."""
        lr_features, hr_features = features
        return self._decode_scales(lr_features, hr_features, output.extras["detail_box"], output.logits.shape[-2:])

    @property
    def decoder_levels(self) -> List[str]:
        levels = list(super().decoder_levels)
        if self.scale_attention_head is not None:
            levels += [k for k in levels_read_by(self.scale_attention_head) if k not in levels]
        return levels

    def _checked_box(self, box: Sequence[int], height: int, width: int) -> Box:
        y1, y2, x1, x2 = (int(v) for v in box)
        os = self.output_stride
        if not (0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width) or any(v % os for v in (y1, y2, x1, x2)):
            raise ValueError(
                f"HRDA detail box {tuple(box)} must lie in the {height}x{width} image with coordinates divisible by "
                f"the output stride {os}"
            )
        return (y1, y2, x1, x2)

    def loss(
        self,
        output: SegmentorOutput,
        labels: torch.Tensor,
        pixel_weight: Optional[torch.Tensor] = None,
        fused_weight: float = 1.0,
    ) -> torch.Tensor:
        """``fused_weight (1 - lr_w - hr_w) CE(fused) + hr_w CE(HR, labels in the box) + lr_w CE(LR)``
        (``HRDAHead.losses``; ``fused_weight`` scales mmseg's ``decode.loss_seg`` alone, as MIC's lambda does)."""

        def ce(logits: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
            return seg_cross_entropy(logits, y, w, self.ignore_value, self.loss_average)

        loss = fused_weight * (1 - self.lr_loss_weight - self.hr_loss_weight) * ce(output.logits, labels, pixel_weight)
        if self.hr_loss_weight > 0:
            box = output.extras["detail_box"]
            weight = None if pixel_weight is None else crop(pixel_weight, box)
            loss = loss + self.hr_loss_weight * ce(output.extras["hr_logits"], crop(labels, box), weight)
        if self.lr_loss_weight > 0:
            lr_logits = output.extras["lr_logits"]
            if self.lr_loss_on_attended_logits:
                lr_logits = (1 - output.extras["attention"]) * lr_logits
            loss = loss + self.lr_loss_weight * ce(lr_logits, labels, pixel_weight)
        return loss

    # ------------------------------------------------------------------ inference
    def _slide_hr_logits(self, hr_image: torch.Tensor) -> torch.Tensor:
        """Detail logits of the whole image from overlapping windows, all in one batch (``extract_slide_feat`` +
        ``HRDAHead.decode_hr``)."""
        n, _, height, width = hr_image.shape
        crop_size = clamp_crop_size(self.hr_crop_size, height, width)
        base = [s if s > 0 else full for s, full in zip(self.hr_crop_size, (height, width))]
        stride = [s // 2 for s in base] if self.hr_slide_overlapping else base
        boxes = slide_windows(height, width, crop_size, stride)
        windows = torch.cat([crop(hr_image, b) for b in boxes])
        window_logits = self.decode(self.extract_features(windows))
        os = self.output_stride
        logits = window_logits.new_zeros((n, window_logits.shape[1], height // os, width // os))
        count = window_logits.new_zeros((1, 1, height // os, width // os))
        for i, box in enumerate(boxes):
            y1, y2, x1, x2 = scale_box(box, os)
            logits[:, :, y1:y2, x1:x2] += window_logits[i * n : (i + 1) * n]
            count[:, :, y1:y2, x1:x2] += 1
        return logits / count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fused logits on the full-resolution logit grid (the input size / output stride), no detail crop
        (``encode_decode`` with ``upscale_pred=False``)."""
        self._check_input(x)
        lr_features = self.extract_features(self._rescale(x, self.lr_scale))
        lr_logits = self.decode(lr_features)
        hr_image = self._detail_view(x)
        if self.hr_slide_inference:
            hr_logits = self._slide_hr_logits(hr_image)
        else:
            hr_logits = self.decode(self.extract_features(hr_image))
        fused, _ = self.fuse(lr_logits, hr_logits, self._attention(lr_features, lr_logits), None)
        return fused
