"""Detectron2's yacs config, rebuilt on fvcore's CfgNode.

Only the default keys this project reads are defined here, with Detectron2's default values; every key we add
on top lives in :func:`uda_plugins.config.add_uda_config`. A test checks that each key below exists in the real
``detectron2.config.get_cfg()`` with the same default, so a config file means the same on both backends.
"""

from __future__ import annotations

import os

from fvcore.common.config import CfgNode as _FvcoreCfgNode

__all__ = ["CfgNode", "get_cfg"]


class CfgNode(_FvcoreCfgNode):
    """fvcore's CfgNode (``_BASE_`` inheritance, type-checked merges, unknown keys rejected) plus the two
    things Detectron2's subclass adds that we rely on: unsafe YAML allowed by default and a clear error for a
    config file that does not exist."""

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = True) -> None:
        if not os.path.isfile(cfg_filename):
            raise FileNotFoundError(f"Config file '{cfg_filename}' does not exist")
        loaded = self.load_yaml_with_base(cfg_filename, allow_unsafe=allow_unsafe)
        loaded = type(self)(loaded)
        # Detectron2 upgrades configs from older VERSIONs; every config here is VERSION 2, the only one we accept.
        version = loaded.get("VERSION", 2)
        if version != 2:
            raise ValueError(f"{cfg_filename}: config VERSION {version} is not supported (only 2)")
        self.merge_from_other_cfg(loaded)


def _defaults() -> CfgNode:
    _C = CfgNode()
    _C.VERSION = 2

    _C.MODEL = CfgNode()
    _C.MODEL.DEVICE = "cuda"
    _C.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    _C.MODEL.WEIGHTS = ""
    _C.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
    _C.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]
    _C.MODEL.BACKBONE = CfgNode()
    _C.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    _C.MODEL.BACKBONE.FREEZE_AT = 2
    _C.MODEL.SEM_SEG_HEAD = CfgNode()
    _C.MODEL.SEM_SEG_HEAD.NAME = "SemSegFPNHead"
    _C.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    _C.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    _C.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 54
    _C.MODEL.SEM_SEG_HEAD.CONVS_DIM = 128
    _C.MODEL.SEM_SEG_HEAD.NORM = "GN"
    _C.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT = 1.0

    _C.INPUT = CfgNode()
    _C.INPUT.FORMAT = "BGR"

    _C.DATASETS = CfgNode()
    _C.DATASETS.TRAIN = ()
    _C.DATASETS.TEST = ()

    _C.DATALOADER = CfgNode()
    _C.DATALOADER.NUM_WORKERS = 4

    _C.SOLVER = CfgNode()
    _C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    _C.SOLVER.MAX_ITER = 40000
    _C.SOLVER.BASE_LR = 0.001
    _C.SOLVER.MOMENTUM = 0.9
    _C.SOLVER.NESTEROV = False
    _C.SOLVER.WEIGHT_DECAY = 0.0001
    _C.SOLVER.WEIGHT_DECAY_NORM = 0.0
    _C.SOLVER.GAMMA = 0.1
    _C.SOLVER.STEPS = (30000,)
    _C.SOLVER.WARMUP_FACTOR = 1.0 / 1000
    _C.SOLVER.WARMUP_ITERS = 1000
    _C.SOLVER.WARMUP_METHOD = "linear"
    _C.SOLVER.CHECKPOINT_PERIOD = 5000
    _C.SOLVER.IMS_PER_BATCH = 16
    _C.SOLVER.CLIP_GRADIENTS = CfgNode({"ENABLED": False})
    _C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    _C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    _C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    _C.SOLVER.AMP = CfgNode({"ENABLED": False})

    _C.TEST = CfgNode()
    _C.TEST.EVAL_PERIOD = 0
    _C.TEST.EXPECTED_RESULTS = []

    _C.OUTPUT_DIR = "./output"
    _C.SEED = -1
    _C.CUDNN_BENCHMARK = False
    _C.VIS_PERIOD = 0
    return _C


_DEFAULTS = _defaults()


def get_cfg() -> CfgNode:
    """A fresh copy of the default config (Detectron2's ``get_cfg``)."""
    return _DEFAULTS.clone()
