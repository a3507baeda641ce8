"""The backend seam: the only place in uda_plugins that imports Detectron2.

Every other module imports the Detectron2 names it needs from here. When ``import detectron2`` works these are
Detectron2's own objects; otherwise they come from :mod:`uda_plugins.d2.builtin`, which implements the same
subset with the same names, signatures and semantics. ``UDA_PLUGINS_BACKEND=builtin|detectron2`` forces one;
:data:`BACKEND` says which is active.

Two deliberate exceptions, the builtin versions on both backends:

* ``create_ddp_model``: Detectron2's passes ``device_ids`` even for CPU models and so fails with several CPU
  processes (docs/detectron2-api.md §4.7).
* ``launch``: Detectron2's never destroys the process groups its worker processes create, and ``comm`` keeps the
  default gloo group in an lru_cache; destructed at interpreter exit it aborts about one worker in five
  ("terminate called without an active exception", measured on torch 2.14). Ours is the same function with a
  clean teardown, using the active backend's ``comm``.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = [
    "BACKEND",
    # config
    "CfgNode",
    "get_cfg",
    # modeling
    "META_ARCH_REGISTRY",
    "BACKBONE_REGISTRY",
    "SEM_SEG_HEADS_REGISTRY",
    "Backbone",
    "ShapeSpec",
    "build_model",
    # engine
    "HookBase",
    "TrainerBase",
    "SimpleTrainer",
    "DefaultTrainer",
    "hooks",
    "launch",
    "default_argument_parser",
    "default_setup",
    "default_writers",
    "create_ddp_model",
    # events
    "EventStorage",
    "get_event_storage",
    "has_event_storage",
    "EventWriter",
    "JSONWriter",
    "TensorboardXWriter",
    "CommonMetricPrinter",
    # distributed
    "comm",
    # data
    "DatasetCatalog",
    "MetadataCatalog",
    # checkpoint
    "DetectionCheckpointer",
    # evaluation
    "DatasetEvaluator",
    "DatasetEvaluators",
    "inference_on_dataset",
    "inference_context",
    "print_csv_format",
    # solver
    "LRMultiplier",
    "WarmupParamScheduler",
    # utils
    "setup_logger",
    "seed_all_rng",
]


def _select_backend() -> str:
    forced = os.environ.get("UDA_PLUGINS_BACKEND", "").strip().lower()
    if forced not in ("", "builtin", "detectron2"):
        raise ValueError(f"UDA_PLUGINS_BACKEND must be 'builtin' or 'detectron2', not '{forced}'")
    if forced == "builtin":
        return "builtin"
    if forced == "detectron2":
        if importlib.util.find_spec("detectron2") is None:
            raise ImportError(
                "UDA_PLUGINS_BACKEND=detectron2 but detectron2 is not installed "
                "(pip install --no-build-isolation -e <a detectron2 checkout>)"
            )
        return "detectron2"
    return "detectron2" if importlib.util.find_spec("detectron2") is not None else "builtin"


BACKEND: str = _select_backend()

if BACKEND == "detectron2":
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import CfgNode, get_cfg
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import (
        DefaultTrainer,
        HookBase,
        SimpleTrainer,
        TrainerBase,
        default_argument_parser,
        default_setup,
        default_writers,
        hooks,
    )
    from detectron2.evaluation import (
        DatasetEvaluator,
        DatasetEvaluators,
        inference_context,
        inference_on_dataset,
        print_csv_format,
    )
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import (
        BACKBONE_REGISTRY,
        META_ARCH_REGISTRY,
        SEM_SEG_HEADS_REGISTRY,
        Backbone,
        build_model,
    )
    from detectron2.solver import LRMultiplier, WarmupParamScheduler
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import (
        CommonMetricPrinter,
        EventStorage,
        EventWriter,
        JSONWriter,
        TensorboardXWriter,
        get_event_storage,
        has_event_storage,
    )
    from detectron2.utils.logger import setup_logger

    from .builtin.defaults import create_ddp_model
    from .builtin.launch import launch
else:
    from .builtin import comm, hooks
    from .builtin.catalog import DatasetCatalog, MetadataCatalog
    from .builtin.checkpoint import DetectionCheckpointer
    from .builtin.config import CfgNode, get_cfg
    from .builtin.defaults import (
        DefaultTrainer,
        create_ddp_model,
        default_argument_parser,
        default_setup,
        default_writers,
    )
    from .builtin.evaluation import (
        DatasetEvaluator,
        DatasetEvaluators,
        inference_context,
        inference_on_dataset,
        print_csv_format,
    )
    from .builtin.events import (
        CommonMetricPrinter,
        EventStorage,
        EventWriter,
        JSONWriter,
        TensorboardXWriter,
        get_event_storage,
        has_event_storage,
    )
    from .builtin.launch import launch
    from .builtin.logger import seed_all_rng, setup_logger
    from .builtin.modeling import (
        BACKBONE_REGISTRY,
        META_ARCH_REGISTRY,
        SEM_SEG_HEADS_REGISTRY,
        Backbone,
        ShapeSpec,
        build_model,
    )
    from .builtin.solver import LRMultiplier, WarmupParamScheduler
    from .builtin.train_loop import HookBase, SimpleTrainer, TrainerBase
