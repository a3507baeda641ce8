#!/usr/bin/env python
"""Count the pixels of every class in every label file of a source dataset, once, for rare-class sampling.

    python tools/compute_class_stats.py --dataset gta5_train [--jobs 8] [--force]
    python tools/compute_class_stats.py --config-file configs/<...>.yaml [KEY VALUE ...]   # its SOURCE_TRAIN

This is the class-statistics part of lhoyer/MIC ``seg/tools/convert_datasets/gta.py`` for any registered dataset.
The counts are taken on the label files as stored (original resolution) and cached as
``class_stats.<dataset>.json`` beside the dataset's label folder, or in ``~/.cache/uda_plugins/class_stats`` when
that is not writable (see :mod:`uda_plugins.data.class_stats`). A valid cache is reused; ``--force`` recomputes it.
Training with ``DATALOADER.RCS.ENABLED True`` does the same on its first start, so running this tool is optional:
it moves the one-off cost out of the training job. At the end it prints each class's pixel share and the class
probabilities rare-class sampling would use.
"""

import argparse
import logging
import os
import sys

import numpy as np

import uda_plugins  # noqa: F401  (registers the datasets)
from uda_plugins.d2 import MetadataCatalog
from uda_plugins.data.build import get_dataset_dicts
from uda_plugins.data.class_stats import ensure_class_stats
from uda_plugins.data.labels import IGNORE_LABEL
from uda_plugins.data.samplers import RareClassSampler
from uda_plugins.utils.cli import print_error


def _parse(argv):
    parser = argparse.ArgumentParser(description="Cache the per-image class pixel counts of source datasets.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--dataset", nargs="+", metavar="NAME", help="registered dataset names")
    what.add_argument("--config-file", metavar="FILE", help="use the config's DATASETS.SOURCE_TRAIN")
    parser.add_argument("--num-classes", type=int, help="default: the config's, else the dataset metadata's")
    parser.add_argument("--ignore-label", type=int, help=f"default: the config's, else {IGNORE_LABEL}")
    parser.add_argument(
        "--stats-dir", help="cache folder (default: the config's DATALOADER.RCS.STATS_DIR, else beside each dataset)"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="reader threads (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="recompute even a valid cache")
    parser.add_argument("--temperature", type=float, help="for the printed probabilities (default: config's, 0.01)")
    parser.add_argument("--min-pixels", type=float, help="for the printed probabilities (default: config's, 3000)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (with --config-file)")
    return parser.parse_args(argv)


def _settings(args):
    """(dataset names, num_classes or None, ignore label, stats dir, temperature, min pixels)."""
    if args.config_file:
        from uda_plugins.engine.setup import load_cfg

        cfg, _ = load_cfg(args.config_file, args.opts)  # also registers DATASETS.REGISTER's datasets
        names = cfg.DATASETS.SOURCE_TRAIN
        names = [names] if isinstance(names, str) else list(names)
        rcs = cfg.DATALOADER.RCS
        num_classes = args.num_classes or cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        ignore = args.ignore_label if args.ignore_label is not None else cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        stats_dir = args.stats_dir if args.stats_dir is not None else rcs.STATS_DIR
        temperature, min_pixels = rcs.TEMPERATURE, rcs.MIN_PIXELS
    else:
        if args.opts:
            raise ValueError(f"Config overrides {args.opts} need --config-file")
        names, num_classes, stats_dir = args.dataset, args.num_classes, args.stats_dir or ""
        ignore = args.ignore_label if args.ignore_label is not None else IGNORE_LABEL
        temperature, min_pixels = 0.01, 3000  # DAFormer's
    temperature = args.temperature if args.temperature is not None else temperature
    min_pixels = args.min_pixels if args.min_pixels is not None else min_pixels
    return names, num_classes, ignore, stats_dir, temperature, min_pixels


def _report(name: str, pixels: np.ndarray, temperature: float, min_pixels: float) -> None:
    class_names = MetadataCatalog.get(name).get("stuff_classes")
    if class_names is None or len(class_names) != pixels.shape[1]:
        class_names = [str(c) for c in range(pixels.shape[1])]
    total = pixels.sum(axis=0)
    share = total / max(1, total.sum())
    try:
        probs = RareClassSampler(pixels, temperature, min_pixels, class_names).class_probs
    except ValueError as e:
        print(f"  (no rare-class probabilities: {e})")
        probs = np.zeros(len(total))
    print(f"{'class':<16s} {'pixels %':>9s} {f'images >{min_pixels:g}':>12s} {f'P(T={temperature:g})':>10s}")
    for c, cname in enumerate(class_names):
        images = int((pixels[:, c] > min_pixels).sum())
        print(f"{cname:<16s} {100 * share[c]:9.3f} {images:12d} {probs[c]:10.4f}")


def main(argv=None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        names, num_classes, ignore, stats_dir, temperature, min_pixels = _settings(args)
        for name in names:
            n = num_classes
            if n is None:
                stuff = MetadataCatalog.get(name).get("stuff_classes")
                if not stuff:
                    raise ValueError(f"Dataset '{name}' has no class list in its metadata: pass --num-classes")
                n = len(stuff)
            dicts = get_dataset_dicts([name])
            pixels, path = ensure_class_stats(
                name, dicts, n, ignore, stats_dir=stats_dir, jobs=args.jobs, force=args.force
            )
            print(f"{name}: class statistics of {len(dicts)} images in {path}")
            _report(name, pixels, temperature, min_pixels)
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:  # bad input: one line naming the file
        return print_error("compute_class_stats.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
