"""Networks: timm backbones, decode heads, the Segmentor, losses and inference. Importing registers them."""

from . import backbones, heads  # noqa: F401  (registration)
from .inference import class_maximum, predicted_classes, segment, slide_inference, whole_inference
from .losses import seg_cross_entropy, upsample_like
from .segmentor import Segmentor, SegmentorOutput, build_segmentor, size_groups, stack_images

__all__ = [
    "Segmentor",
    "SegmentorOutput",
    "build_segmentor",
    "size_groups",
    "stack_images",
    "seg_cross_entropy",
    "upsample_like",
    "segment",
    "class_maximum",
    "predicted_classes",
    "slide_inference",
    "whole_inference",
]
