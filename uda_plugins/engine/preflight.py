"""What a config is checked for before anything is built, so that bad input fails in the first seconds with one
line: every dataset it names is registered (and the evaluation sets can be read) and has the model's number of
classes, and the weights it starts from exist, or it says which config writes them."""

from __future__ import annotations

import difflib
import glob
import os
from typing import List, Optional

from uda_plugins.d2 import CfgNode, DatasetCatalog, MetadataCatalog

__all__ = [
    "check_class_counts",
    "check_dataset_names",
    "check_weights",
    "config_writing",
    "preflight",
    "read_test_sets",
]

_DATASET_KEYS = ("SOURCE_TRAIN", "TARGET_TRAIN", "TEST")


def _names(value) -> List[str]:
    return [value] if isinstance(value, str) else list(value)


def check_dataset_names(cfg: CfgNode) -> None:
    """Every name in ``DATASETS.SOURCE_TRAIN``, ``TARGET_TRAIN`` and ``TEST`` is registered."""
    registered = DatasetCatalog.list()
    for key in _DATASET_KEYS:
        for name in _names(cfg.DATASETS[key]):
            if name not in registered:
                close = " or ".join(repr(c) for c in difflib.get_close_matches(name, registered, n=3))
                hint = f"did you mean {close}?" if close else "no registered name is close"
                raise KeyError(
                    f"DATASETS.{key} names '{name}', which is not a registered dataset ({hint}; datasets/README.md "
                    "lists the standard names, DATASETS.REGISTER adds your own)"
                )


def check_class_counts(cfg: CfgNode) -> None:
    """``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` equals the number of classes of every dataset the config names (its
    metadata's ``stuff_classes``, known at registration without reading a file)."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    for key in _DATASET_KEYS:
        for name in _names(cfg.DATASETS[key]):
            classes = MetadataCatalog.get(name).get("stuff_classes")
            if classes is not None and len(classes) != num_classes:
                raise ValueError(
                    f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes} but dataset '{name}' (DATASETS.{key}) has "
                    f"{len(classes)} classes ({_short_list(classes)}): set NUM_CLASSES {len(classes)}"
                )


def _short_list(items, n: int = 4) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def read_test_sets(cfg: CfgNode) -> None:
    """Read the evaluation sets' file lists now (their folders, images and label files: each missing one fails
    naming it), not at the first evaluation."""
    for name in _names(cfg.DATASETS.TEST):
        if not DatasetCatalog.get(name):
            raise ValueError(f"DATASETS.TEST: dataset '{name}' is empty")


def _configs_root(config_file: str) -> str:
    """The ``configs`` folder a config file lives in (the nearest ancestor of that name), else its own folder."""
    folder = os.path.dirname(os.path.abspath(config_file))
    probe = folder
    while True:
        if os.path.basename(probe) == "configs":
            return probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return folder
        probe = parent


def config_writing(weights: str, config_file: str) -> Optional[str]:
    """The config (under the same ``configs`` folder as ``config_file``) whose ``OUTPUT_DIR`` is the folder of
    ``weights``, i.e. the run that writes that checkpoint; None if there is none."""
    target = os.path.normpath(os.path.abspath(os.path.dirname(weights)))
    for path in sorted(glob.glob(os.path.join(_configs_root(config_file), "**", "*.yaml"), recursive=True)):
        try:
            output_dir = CfgNode.load_yaml_with_base(path).get("OUTPUT_DIR")
        except Exception:  # a broken neighbour must not hide the real message
            continue
        if output_dir and os.path.normpath(os.path.abspath(output_dir)) == target:
            relative = os.path.relpath(path)
            return path if relative.startswith("..") else relative
    return None


def check_weights(cfg: CfgNode, config_file: str, resume: bool = False) -> None:
    """``MODEL.WEIGHTS`` is a file (unless ``--resume`` continues from a checkpoint in OUTPUT_DIR, which replaces
    it, or it is a URL); when it is missing, say which config writes it."""
    weights = cfg.MODEL.WEIGHTS
    if not weights or "://" in weights or os.path.isfile(weights):
        return
    if resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    writer = config_writing(weights, config_file)
    if writer:
        raise FileNotFoundError(
            f"MODEL.WEIGHTS '{weights}' does not exist: it is written by {writer}; train that first "
            f"(python tools/train_net.py --config-file {writer}) or point MODEL.WEIGHTS at your own checkpoint"
        )
    raise FileNotFoundError(f"MODEL.WEIGHTS file '{weights}' does not exist")


def preflight(cfg: CfgNode, config_file: str, resume: bool = False, eval_only: bool = False) -> None:
    """Every check above, before a model or a loader is built."""
    check_dataset_names(cfg)
    check_class_counts(cfg)
    check_weights(cfg, config_file, resume)
    if not eval_only:  # evaluation reads them at once anyway
        read_test_sets(cfg)
