"""Turning command-line arguments into a frozen config, the Detectron2 way."""

from __future__ import annotations

import logging
import os
from typing import List, Tuple

import torch

from uda_plugins.config import get_uda_cfg
from uda_plugins.d2 import BACKEND, CfgNode, comm, default_setup, setup_logger
from uda_plugins.release_fidelity import apply_release_fidelity

__all__ = [
    "setup_cfg",
    "load_cfg",
    "load_frozen_cfg",
    "register_config_datasets",
    "resolve_device",
    "merge_overrides",
    "set_determinism",
    "log_config_notes",
]

logger = logging.getLogger(__name__)


def resolve_device(cfg: CfgNode) -> str:
    """Run a CUDA config on the CPU where there is no GPU (the default configs say cuda), with its float16
    autocast (a GPU setting: GradScaler) as bfloat16, the CPU's; returns a warning to log, or ""."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        requested = cfg.MODEL.DEVICE
        cfg.MODEL.DEVICE = "cpu"
        warning = f"MODEL.DEVICE is '{requested}' but CUDA is not available: running on the CPU"
        if cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.PRECISION == "float16":
            cfg.SOLVER.AMP.PRECISION = "bfloat16"
            warning += ", with SOLVER.AMP.PRECISION bfloat16 (float16 autocast needs CUDA)"
        return warning
    return ""


def merge_overrides(cfg: CfgNode, opts: list) -> None:
    """``cfg.merge_from_list(opts)``, failing like a config file does: yacs asserts on an unknown key from the
    command line, a file raises ``KeyError('Non-existent config key: ...')``."""
    if len(opts) % 2:
        raise ValueError(f"Config overrides must be KEY VALUE pairs, got an odd number: {opts}")
    try:
        cfg.merge_from_list(opts)
    except AssertionError as e:
        if "Non-existent key" in str(e):
            raise KeyError(str(e).replace("Non-existent key", "Non-existent config key")) from None
        raise


def set_determinism(cfg: CfgNode) -> None:
    """Apply ``DETERMINISTIC`` (after ``default_setup``, which sets cuDNN's benchmark flag from the config)."""
    if not cfg.DETERMINISTIC:
        return
    if cfg.CUDNN_BENCHMARK:
        raise ValueError("DETERMINISTIC needs CUDNN_BENCHMARK False (benchmarking picks kernels by timing)")
    # cuBLAS needs a fixed workspace for reproducible results; read when CUDA first creates a handle.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    # warn_only: a few CUDA kernels every model here uses (bilinear upsampling's backward) have no deterministic
    # version; they warn once instead of making the switch unusable, and are the only remaining source of noise.
    torch.use_deterministic_algorithms(True, warn_only=True)
    logger.info("DETERMINISTIC: deterministic algorithms where torch has them (torch.use_deterministic_algorithms)")


def load_cfg(config_file: str, opts=()) -> Tuple[CfgNode, List[Tuple[int, str]]]:
    """``get_uda_cfg`` + ``config_file`` + ``KEY VALUE`` overrides, ``UDA.RELEASE_FIDELITY`` and the device resolved
    (not frozen); returns the config and (logging level, message) pairs about what was resolved: the device
    fallback (a warning) and what the umbrella changed. What every tool reads a config with."""
    if not config_file:
        raise ValueError("--config-file is required (e.g. configs/synthetic/source_only.yaml)")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Config file '{config_file}' does not exist")
    cfg = get_uda_cfg()
    cfg.merge_from_file(config_file)
    merge_overrides(cfg, list(opts or []))
    fidelity = cfg.UDA.RELEASE_FIDELITY
    changes = apply_release_fidelity(cfg, list(opts or []))
    register_config_datasets(cfg)
    warning = resolve_device(cfg)
    notes = [(logging.WARNING, warning)] if warning else []
    if changes:
        notes.append((logging.INFO, f"UDA.RELEASE_FIDELITY {fidelity}: " + "; ".join(changes)))
    return cfg, notes


def log_config_notes(notes: List[Tuple[int, str]]) -> None:
    """Log what :func:`load_cfg` resolved, each (level, message) at its level."""
    for level, message in notes:
        logger.log(level, message)


def load_frozen_cfg(config_file: str, opts=()) -> CfgNode:
    """:func:`load_cfg`, its device warning logged, frozen: what a tool that only reads the config uses."""
    cfg, notes = load_cfg(config_file, opts)
    log_config_notes(notes)
    cfg.freeze()
    return cfg


def register_config_datasets(cfg: CfgNode) -> None:
    """Register the image-folder datasets of ``DATASETS.REGISTER`` (idempotent)."""
    from uda_plugins.data.datasets.image_folder import register_datasets_file

    for path in cfg.DATASETS.REGISTER:
        register_datasets_file(path)


def setup_cfg(args) -> CfgNode:
    """``get_uda_cfg`` + ``--config-file`` + trailing ``KEY VALUE`` overrides, frozen; then Detectron2's
    ``default_setup`` (output dir, logs, config.yaml, seeds) and the uda_plugins logger."""
    cfg, notes = load_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    set_determinism(cfg)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="uda_plugins")
    if cfg.MODEL.DEVICE == "cpu" and comm.get_world_size() > 1:
        # Several processes on one CPU: share the cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    logger.info(f"uda_plugins backend: {BACKEND} (UDA_PLUGINS_BACKEND to force builtin|detectron2)")
    log_config_notes(notes)
    return cfg
