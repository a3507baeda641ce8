"""One module per UDA method, each registering its meta-architecture."""

import torch

from uda_plugins.d2 import CfgNode, build_model
from uda_plugins.modeling.segmentor import compile_segmentors

from .base import UDAMetaArch
from .dacs import DACS
from .duda import DUDA
from .mcl import MCL
from .quad_mix import QuadMix
from .self_training import SelfTrainingArch
from .source_only import SourceOnly
from .stal import STAL
from .target_only import TargetOnly

__all__ = [
    "build_meta_arch",
    "UDAMetaArch",
    "SelfTrainingArch",
    "SourceOnly",
    "TargetOnly",
    "DACS",
    "QuadMix",
    "DUDA",
    "MCL",
    "STAL",
]


def build_meta_arch(cfg: CfgNode) -> torch.nn.Module:
    """Detectron2's ``build_model`` (the registered ``MODEL.META_ARCHITECTURE`` on ``MODEL.DEVICE``), every network
    of it in channels-last memory when ``MODEL.CHANNELS_LAST`` (the segmentors then hand their inputs over in it),
    and every segmentor's networks compiled when ``MODEL.COMPILE.ENABLED``."""
    model = build_model(cfg)
    if cfg.MODEL.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    if cfg.MODEL.COMPILE.ENABLED:
        compile_segmentors(model, backend=cfg.MODEL.COMPILE.BACKEND, mode=cfg.MODEL.COMPILE.MODE)
    return model
