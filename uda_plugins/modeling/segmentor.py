"""The segmentation network a method trains: pixel normalisation, a backbone and a decode head.

``Segmentor`` is what a meta-architecture holds as ``student`` (and deep-copies as ``teacher``). The contract a
method relies on (HRDA's multi-resolution segmentor keeps it, so every method composes with HRDA):

* ``forward_train(x)`` -> :class:`SegmentorOutput` (logits and the encoder features, for FD);
* ``loss(output, labels, pixel_weight)`` -> the supervised loss of that output (a weighted sum where a model
  has several outputs);
* ``predict(x)`` -> logits at the input resolution (pseudo-labels, whole-image and sliding-window inference);
* ``forward(x)`` -> logits at the head's stride;
* ``views(output)`` / ``decode_views(features, output)``: the encoder features of each view a training forward
  looked at, and the output the decoder gives for replacement features of those views (same crop boxes), which
  ``loss`` accepts — how Guidance Training decodes its reconstructed features with the shared head;
* ``decoder_levels`` -> the feature levels the decoding reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from uda_plugins.d2 import BACKBONE_REGISTRY, SEM_SEG_HEADS_REGISTRY, CfgNode, ShapeSpec

from .losses import LOSS_AVERAGES, seg_cross_entropy, upsample_like

__all__ = [
    "Segmentor",
    "SegmentorOutput",
    "View",
    "build_segmentor",
    "compile_segmentors",
    "levels_read_by",
    "size_groups",
    "stack_images",
]


@dataclass
class SegmentorOutput:
    """What one training forward of a segmentor produced.

    ``logits``: (N, C, h, w) at the head's stride over the whole input. ``features``: the encoder outputs; for a
    multi-resolution model those of the scale ``Segmentor.feature_scale`` says. ``extras``: model-specific
    outputs its ``loss`` needs (HRDA: the detail logits and the detail crop box).
    """

    logits: torch.Tensor
    features: Dict[str, torch.Tensor]
    extras: dict = field(default_factory=dict)


@dataclass
class View:
    """One view a training forward encoded: its features, the image scale it was taken at and its crop box in the
    image at that scale (``(y1, y2, x1, x2)``; None = the whole image)."""

    features: Dict[str, torch.Tensor]
    scale: float = 1.0
    box: Optional[Tuple[int, int, int, int]] = None


def _size_origin(d: dict, key: str) -> str:
    """Where the size of ``d[key]`` comes from: its file and the config keys of its geometry."""
    h, w = d[key].shape[-2:]
    name, rule, g = d.get("file_name", "?"), d.get("input_config", "INPUT.*"), d.get("geometry")
    if g is None:
        return f"{h}x{w} from '{name}'"
    (oh, ow), (rh, rw), crop = g["orig_size"], g["resized_size"], g["crop"]
    if key != "image" or (crop[2], crop[3]) == (rh, rw):
        return f"{h}x{w} from '{name}' ({oh}x{ow} resized by {rule}.RESIZE and RESIZE_MODE)"
    return (
        f"{h}x{w} from '{name}' ({oh}x{ow} scaled to {rh}x{rw} by {rule}.RESIZE, RESIZE_MODE and RATIO_RANGE, "
        f"then cropped by {rule}.CROP_SIZE and CROP_PAD)"
    )


def stack_images(dicts: Sequence[dict], device: torch.device, key: str = "image") -> torch.Tensor:
    """The ``key`` tensors of a list of mapped dicts as one (N, C, H, W) float tensor on ``device``; images of
    different sizes fail naming a file of each size and the config keys that produced it."""
    images = [d[key] for d in dicts]
    origins: Dict[tuple, str] = {}
    for d, image in zip(dicts, images):
        origins.setdefault(tuple(image.shape), _size_origin(d, key))
    if len(origins) != 1:
        raise ValueError(
            "A training batch needs images of one size (set INPUT.*.CROP_SIZE and CROP_PAD), got "
            + " and ".join(origins.values())
        )
    return torch.stack(images).to(device, non_blocking=True).float()


def size_groups(dicts: Sequence[dict], key: str = "image") -> List[List[dict]]:
    """``dicts`` in groups of one ``key`` size, in order of first appearance: whole images of several aspect
    ratios (Mapillary's, a folder of photos) are predicted a group at a time."""
    groups: Dict[tuple, List[dict]] = {}
    for d in dicts:
        groups.setdefault(tuple(d[key].shape), []).append(d)
    return list(groups.values())


class Segmentor(nn.Module):
    """Backbone (``MODEL.BACKBONE.NAME``) + decode head (``MODEL.SEM_SEG_HEAD.NAME``) + normalisation."""

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__()
        self.backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(
            cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
        )
        self.head = SEM_SEG_HEADS_REGISTRY.get(cfg.MODEL.SEM_SEG_HEAD.NAME)(cfg, self.backbone.output_shape())
        self.num_classes: int = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.ignore_value: int = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        self.loss_average: str = cfg.MODEL.SEM_SEG_HEAD.LOSS_AVERAGE
        if self.loss_average not in LOSS_AVERAGES:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.LOSS_AVERAGE '{self.loss_average}' is not one of {LOSS_AVERAGES}")
        self.channels_last: bool = cfg.MODEL.CHANNELS_LAST
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), persistent=False)
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT '{cfg.INPUT.FORMAT}' is neither RGB nor BGR")
        # Images travel as RGB (decoding, augmentation, mixing, colour transfer, pictures); the network sees
        # INPUT.FORMAT's order, that of MODEL.PIXEL_MEAN/STD and of its pretrained first layer. normalize and
        # denormalize are the one place that converts, for training, evaluation, prediction and every tool.
        self.input_bgr: bool = cfg.INPUT.FORMAT == "BGR"

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB images in 0..255 -> the network's input: INPUT.FORMAT's channel order, zero mean and unit
        variance (channels-last with MODEL.CHANNELS_LAST)."""
        x = images.to(self.pixel_mean.device).float()
        x = ((x.flip(1) if self.input_bgr else x) - self.pixel_mean) / self.pixel_std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input -> RGB images in 0..255 (the inverse of :meth:`normalize`)."""
        y = x * self.pixel_std + self.pixel_mean
        return y.flip(1) if self.input_bgr else y

    def extract_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.backbone(x)

    def decode(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> logits at the head's output stride."""
        return self.decode(self.extract_features(x))

    # The input scale at which ``SegmentorOutput.features`` were computed (HRDA: its context scale).
    feature_scale: float = 1.0

    def forward_train(self, x: torch.Tensor) -> SegmentorOutput:
        features = self.extract_features(x)
        return SegmentorOutput(self.decode(features), features)

    def views(self, output: SegmentorOutput) -> List[View]:
        return [View(output.features)]

    def decode_views(self, features: Sequence[Dict[str, torch.Tensor]], output: SegmentorOutput) -> SegmentorOutput:
        (only,) = features
        return SegmentorOutput(self.decode(only), only)

    @property
    def decoder_levels(self) -> List[str]:
        return levels_read_by(self.head)

    def networks(self) -> List[nn.Module]:
        """The modules that do the compute (what ``MODEL.COMPILE`` compiles): the backbone and the decode head."""
        return [self.backbone, self.head]

    def loss(
        self,
        output: SegmentorOutput,
        labels: torch.Tensor,
        pixel_weight: Optional[torch.Tensor] = None,
        fused_weight: float = 1.0,
    ) -> torch.Tensor:
        """Cross-entropy of ``output`` against (N, H, W) ``labels`` at the input resolution, times
        ``fused_weight`` (mmseg's ``decode.loss_seg``, the only term of a single-scale network; HRDA has more)."""
        return fused_weight * seg_cross_entropy(
            output.logits, labels, pixel_weight, self.ignore_value, self.loss_average
        )

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input resolution for a normalised batch."""
        return upsample_like(self(x), x.shape[-2:])


def levels_read_by(head: nn.Module) -> List[str]:
    if hasattr(head, "in_features"):
        return list(head.in_features)
    if hasattr(head, "in_feature"):
        return [head.in_feature]
    raise AttributeError(f"{type(head).__name__} names no in_features / in_feature")


def compile_segmentors(model: nn.Module, backend: str = "inductor", mode: str = "default") -> int:
    """``torch.compile`` the networks of every :class:`Segmentor` in ``model`` in place (``nn.Module.compile``: the
    parameters and the state-dict keys stay as they are, so the EMA, checkpoints and DDP see the same model). The
    segmentors' glue — normalisation, HRDA's crops and slides, the losses — stays eager: its shapes and branches
    change with the method and the step. Returns the number of modules compiled."""
    networks = [n for m in model.modules() if isinstance(m, Segmentor) for n in m.networks()]
    for network in networks:
        network.compile(backend=backend, mode=mode)
    return len(networks)


def build_segmentor(cfg: CfgNode) -> Segmentor:
    """The network ``cfg`` describes: HRDA's multi-resolution segmentor when ``MODEL.HRDA.ENABLED``."""
    if cfg.MODEL.HRDA.ENABLED:
        from .hrda import HRDASegmentor

        return HRDASegmentor(cfg)
    return Segmentor(cfg)
