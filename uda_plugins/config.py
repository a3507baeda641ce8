"""Every config key uda_plugins adds to Detectron2's, with its default and why it exists.

Call :func:`add_uda_config` on a fresh ``get_cfg()`` before ``merge_from_file`` (yacs rejects unknown keys with
``KeyError: 'Non-existent config key: <KEY>'``, which is how a misspelt key fails). Keys Detectron2 already has
(``SOLVER.BASE_LR``, ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``, ``TEST.EVAL_PERIOD``, ``VIS_PERIOD`` ...) keep their
Detectron2 meaning; for a few of them this function sets a project-wide default (marked "project default").

Batch sizes are *global* (summed over all processes), as Detectron2's ``SOLVER.IMS_PER_BATCH``.
Sizes are ``(height, width)`` in pixels everywhere.
"""

from __future__ import annotations

from uda_plugins.d2 import CfgNode as CN
from uda_plugins.d2 import get_cfg

__all__ = ["add_uda_config", "get_uda_cfg"]


def _add_domain_input(node: CN, *, resize, crop, cat_max_ratio: float, flip: float) -> None:
    # Resize so the image fits inside (h, w) keeping its aspect ratio (mmseg's keep_ratio rule);
    # (0, 0) keeps the original size.
    node.RESIZE = resize
    # Multiply that scale by a factor drawn uniformly from this range (1, 1 = no random scaling).
    node.RATIO_RANGE = (1.0, 1.0)
    # Random crop (h, w) after resizing; (0, 0) disables cropping.
    node.CROP_SIZE = crop
    # Re-draw the crop (up to 10 times) while one class covers more than this fraction of its labelled
    # pixels (mmseg's cat_max_ratio). Needs labels, so it is ignored on unlabelled target images.
    node.CROP_CAT_MAX_RATIO = cat_max_ratio
    # Probability of a horizontal flip.
    node.FLIP_PROB = flip


def add_uda_config(cfg: CN) -> None:
    """Add the keys of this project to ``cfg`` (a Detectron2 ``get_cfg()``) in place."""
    _C = cfg

    # ------------------------------------------------------------------ datasets
    # Labelled source datasets; several names are concatenated into one source domain.
    _C.DATASETS.SOURCE_TRAIN = ("synthetic_source_train",)
    # Unlabelled target domains: one entry per target domain (multi-target methods use several); every batch
    # holds IMS_PER_BATCH_TARGET images of each.
    _C.DATASETS.TARGET_TRAIN = ("synthetic_target_train",)
    # DATASETS.TEST (Detectron2's key) names the evaluation sets.

    # ------------------------------------------------------------------ input
    # Channel order of MODEL.PIXEL_MEAN/STD and of images given to the model (project default).
    _C.INPUT.FORMAT = "RGB"
    _C.INPUT.SOURCE = CN()
    _add_domain_input(_C.INPUT.SOURCE, resize=(0, 0), crop=(0, 0), cat_max_ratio=1.0, flip=0.5)
    _C.INPUT.TARGET = CN()
    _add_domain_input(_C.INPUT.TARGET, resize=(0, 0), crop=(0, 0), cat_max_ratio=1.0, flip=0.5)
    _C.INPUT.TEST = CN()
    # Resize test images to fit (h, w) keeping the aspect ratio; predictions are resized back to the original
    # size before they are scored against the full-resolution label. (0, 0) keeps the original size.
    _C.INPUT.TEST.RESIZE = (0, 0)

    # ------------------------------------------------------------------ dataloader
    # DATALOADER.NUM_WORKERS (Detectron2's key): worker processes building whole UDA batches.

    # ------------------------------------------------------------------ model
    # ImageNet statistics in RGB order, 0..255 (project default; Detectron2's is Caffe BGR).
    _C.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    _C.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    _C.MODEL.META_ARCHITECTURE = "SourceOnly"  # project default
    _C.MODEL.BACKBONE.NAME = "build_dilated_resnet_backbone"
    # Names of the backbone outputs, shallow to deep (res2..res5 for both ResNets and MiT).
    _C.MODEL.BACKBONE.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Normalisation in the backbone: "BN", "SyncBN", "FrozenBN" (statistics and affine frozen) or "GN".
    _C.MODEL.BACKBONE.NORM = "BN"
    # Local file with ImageNet weights for the encoder (timm, torchvision or mmseg/mmcv key names). Empty:
    # random initialisation. Nothing is ever downloaded.
    _C.MODEL.BACKBONE.PRETRAINED = ""
    _C.MODEL.TIMM = CN()
    # The timm architecture: resnet18/34/50/101/152 (dilated ResNets) or pvt_v2_b0..b5 (MiT encoders).
    _C.MODEL.TIMM.ARCH = "resnet101"
    # ResNets only: 8 dilates the last two stages (DeepLab), 16 the last one, 32 none.
    _C.MODEL.TIMM.OUTPUT_STRIDE = 8
    # ResNets only: "" is the 7x7 stem; "deep" the three 3x3 convs of ResNet-v1c (mmseg's "r101v1c").
    _C.MODEL.TIMM.STEM = ""
    # ResNets only: width of the deep stem's first convs (v1c uses 32 -> 32 -> 64).
    _C.MODEL.TIMM.STEM_WIDTH = 32
    # ResNets only: override the per-stage widths / block counts (small CPU models); () = the architecture's.
    _C.MODEL.TIMM.CHANNELS = ()
    _C.MODEL.TIMM.LAYERS = ()
    # Stochastic depth rate (MiT in DAFormer uses 0.1).
    _C.MODEL.TIMM.DROP_PATH_RATE = 0.0

    # The decode head (DeepLabV2Head, SegFormerHead or DAFormerHead), the backbone outputs it reads, and the number
    # of classes (project defaults: DeepLab-V2 on res5, the 19 Cityscapes classes).
    _C.MODEL.SEM_SEG_HEAD.NAME = "DeepLabV2Head"
    _C.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
    _C.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 19
    # Norm inside the decode heads ("BN", "SyncBN", "GN", "" = none; project default BN, as DAFormer/SegFormer).
    _C.MODEL.SEM_SEG_HEAD.NORM = "BN"
    # DeepLabV2 classifier: one 3x3 conv per dilation, summed (6, 12 is DAFormer's "dlv2red").
    _C.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS = (6, 12, 18, 24)
    # SegFormer / DAFormer heads: width of the per-level embeddings.
    _C.MODEL.SEM_SEG_HEAD.EMBED_DIM = 256
    # DAFormer head: dilations of the depthwise-separable context-aware fusion.
    _C.MODEL.SEM_SEG_HEAD.FUSION_DILATIONS = (1, 6, 12, 18)
    # Dropout before the classifier.
    _C.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1

    # ------------------------------------------------------------------ solver
    # Source images per iteration (global).
    _C.SOLVER.IMS_PER_BATCH_SOURCE = 2
    # Target images per iteration (global), for *each* target domain.
    _C.SOLVER.IMS_PER_BATCH_TARGET = 2
    # "ADAMW" (DAFormer family) or "SGD" (DeepLab family).
    _C.SOLVER.OPTIMIZER = "ADAMW"
    _C.SOLVER.BETAS = (0.9, 0.999)
    # Learning-rate multiplier for parameters whose name contains "head" (mmcv's paramwise rule).
    _C.SOLVER.HEAD_LR_MULTIPLIER = 10.0
    # Parameters whose name contains any of these get no weight decay (normalisation layers are handled by
    # Detectron2's SOLVER.WEIGHT_DECAY_NORM, 0 by default).
    _C.SOLVER.NO_WEIGHT_DECAY_KEYWORDS = ("pos_block", "token")
    # "WarmupPolyLR" (mmcv's poly with a multiplicative linear warmup, as DAFormer/MIC) or Detectron2's
    # "WarmupMultiStepLR" / "WarmupCosineLR".
    _C.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    _C.SOLVER.POLY_LR_POWER = 1.0
    # The learning rate the poly schedule decays to.
    _C.SOLVER.POLY_LR_END = 0.0
    # Keep at most this many periodic checkpoints (model_final is always kept); 0 keeps all.
    _C.SOLVER.MAX_CHECKPOINTS_TO_KEEP = 2

    # ------------------------------------------------------------------ test
    # "whole": one forward per image; "slide": overlapping windows of SLIDE_CROP_SIZE with SLIDE_STRIDE.
    _C.TEST.MODE = "whole"
    _C.TEST.SLIDE_CROP_SIZE = (512, 512)
    _C.TEST.SLIDE_STRIDE = (341, 341)
    # Windows per forward in slide mode.
    _C.TEST.SLIDE_BATCH_SIZE = 4
    # Images per rank per forward in whole mode.
    _C.TEST.IMS_PER_BATCH = 1
    # Which network to evaluate: "student" (default: what the papers report), "teacher" or "both"
    # (both are evaluated; results get a student/ teacher/ prefix).
    _C.TEST.EVAL_MODEL = "student"
    # Also keep the checkpoint with the best mIoU on the first test set as model_best_on_test.pth. This is
    # model selection on labelled target data, which unsupervised adaptation does not have: off by default,
    # and labelled as such in the file name.
    _C.TEST.SAVE_BEST_ON_TEST = False


def get_uda_cfg() -> CN:
    """A fresh Detectron2 config with every uda_plugins key added."""
    cfg = get_cfg()
    add_uda_config(cfg)
    return cfg
