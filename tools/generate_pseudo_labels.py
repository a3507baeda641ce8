#!/usr/bin/env python
"""Generate an initial offline pseudo-label bank from any checkpoint (IAST's instance-adaptive selection).

    python tools/generate_pseudo_labels.py --config-file <config> --output <folder> \\
        MODEL.WEIGHTS <warm-up checkpoint.pth> [UDA.PSEUDO_LABEL_BANK.IAS_PROPORTION 0.45] [KEY VALUE ...]

DUDA starts from pseudo-labels its authors only ship as a download (``pseudo_label_0.45``, made with IAST's
generator, which is not in their repository). This tool makes them for any model: every image of
``--dataset`` (default ``DATASETS.TARGET_TRAIN[0]``), resized to fit ``INPUT.TARGET.RESIZE``, is predicted by the
network ``--network`` (student or teacher) and its pixels kept where the confidence passes IAST's running class
thresholds (``UDA.PSEUDO_LABEL_BANK.IAS_*``: about the top PROPORTION of each class), in dataset order. Each label
is written atomically as ``<output>/<image path relative to the images' common folder>.png`` (uint8, 255 =
ignored), which ``UDA.PSEUDO_LABEL_BANK.INITIAL_DIR <output>`` reads; ``class_thresholds.json`` records the final
thresholds and the kept fraction of pixels.
"""

import argparse
import json
import logging
import os
import sys

import torch
from tqdm import tqdm

import uda_plugins  # noqa: F401  (registration)
from uda_plugins.d2 import setup_logger
from uda_plugins.data.build import build_full_view_loader, get_dataset_dicts
from uda_plugins.data.pseudo_label_bank import bank_keys, write_label_atomic
from uda_plugins.engine.checkpoint import load_network
from uda_plugins.engine.setup import load_frozen_cfg
from uda_plugins.methods.duda import ias_pseudo_labels
from uda_plugins.methods.offline_pseudo_labels import InstanceAdaptiveSelector
from uda_plugins.utils.cli import print_error

logger = logging.getLogger("uda_plugins.generate_pseudo_labels")


def generate(cfg, dataset: str, output: str, network_name: str = "student", batch_size: int = 2) -> dict:
    """Write the pseudo-labels of ``dataset`` into ``output``; returns the summary written beside them."""
    network = load_network(cfg, network_name)
    keys = bank_keys([d["file_name"] for d in get_dataset_dicts([dataset])])
    bank_cfg = cfg.UDA.PSEUDO_LABEL_BANK
    ignore = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    selector = InstanceAdaptiveSelector(
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, bank_cfg.IAS_PROPORTION, bank_cfg.IAS_MOMENTUM, bank_cfg.IAS_GAMMA, ignore
    )
    loader = build_full_view_loader(cfg, dataset, batch_size)
    kept = total = 0
    progress = tqdm(total=len(keys), desc=f"pseudo-labels {dataset}", unit="img", disable=None)
    for index, label in ias_pseudo_labels(network, loader, selector):
        write_label_atomic(os.path.join(output, keys[index] + ".png"), label)
        kept += int((label != ignore).sum())
        total += label.size
        progress.update(1)
    progress.close()
    summary = {
        "dataset": dataset,
        "weights": cfg.MODEL.WEIGHTS,
        "network": network_name,
        "images": len(keys),
        "ias": {"proportion": bank_cfg.IAS_PROPORTION, "momentum": bank_cfg.IAS_MOMENTUM, "gamma": bank_cfg.IAS_GAMMA},
        "class_thresholds": [round(float(t), 6) for t in selector.thresholds],
        "kept_fraction": kept / max(total, 1),
    }
    with open(os.path.join(output, "class_thresholds.json"), "w") as f:
        json.dump(summary, f, indent=1)
    logger.info(
        "Wrote %d pseudo-labels to %s (%.1f%% of pixels kept)", len(keys), output, 100 * summary["kept_fraction"]
    )
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True, help="folder for the pseudo-label PNGs")
    parser.add_argument("--dataset", default="", help="a registered dataset (default: DATASETS.TARGET_TRAIN[0])")
    parser.add_argument("--network", default="student", help="student or teacher (methods with a teacher)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per forward")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS")
    args = parser.parse_args(argv)
    setup_logger(name="uda_plugins")
    try:
        cfg = load_frozen_cfg(args.config_file, args.opts)
        dataset = args.dataset or (cfg.DATASETS.TARGET_TRAIN[0] if cfg.DATASETS.TARGET_TRAIN else "")
        if not dataset:
            raise ValueError("No --dataset and DATASETS.TARGET_TRAIN is empty")
        with torch.no_grad():
            generate(cfg, dataset, args.output, args.network, args.batch_size)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        return print_error("generate_pseudo_labels.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
