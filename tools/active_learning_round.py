#!/usr/bin/env python
"""One active-learning round of the authors' restart-per-round protocol (ILM-ASSL): score the target images with a
trained model, pick the next ones to label, have them labelled, write the grown list.

    python tools/active_learning_round.py --config-file <config> --num 35 --output <next list> \\
        [--labelled <current list>] [--strategy entropy|random] \\
        [--annotator ground_truth | --annotator folder --label-folder <folder>] MODEL.WEIGHTS <checkpoint.pth>

Every image of ``--dataset`` (default ``DATASETS.TARGET_TRAIN[0]``), resized to fit ``INPUT.TARGET.RESIZE``, is
scored by ``--network`` (student or teacher) with the mean normalised pixel entropy; per group (the image's folder:
Cityscapes' city) a quota proportional to its images not yet labelled; within each group the strategy picks among
those (uncertainty/entropy: the highest scores; random: uniformly, ``--seed``). The images labelled so far are
``--labelled`` (a list file or ``random:<n>``), by default the config's ``DATASETS.TARGET_LABELED_LIST`` — what the
model was trained with; with none, the round starts from nothing.

Outputs: ``--output`` (the previous list plus the new images, so budgets nest), ``<output>.scores.tsv`` (every
image's score, most uncertain first) and ``<output>.round.json`` (the new images, the quotas, the strategy). The
annotator then provides their labels: ``ground_truth`` checks that the dataset has them (simulation);
``folder`` writes ``round<k>_to_label.txt`` into ``--label-folder`` and, once people have put a label PNG per
image there, checks each (run the same command again); the exit code is 3 while labels are missing.
"""

import argparse
import json
import logging
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import uda_plugins  # noqa: F401  (registration)
from uda_plugins.active_learning.annotation import AnnotationPending, FolderAnnotator, GroundTruthAnnotator
from uda_plugins.active_learning.selection import group_of, image_entropy, select_images
from uda_plugins.d2 import setup_logger
from uda_plugins.data.build import build_full_view_loader, get_dataset_dicts, image_subset
from uda_plugins.data.image_lists import image_keys, read_image_list, write_image_list
from uda_plugins.engine.checkpoint import load_network
from uda_plugins.engine.setup import load_frozen_cfg
from uda_plugins.modeling.inference import predict_full_views
from uda_plugins.utils.cli import print_error

logger = logging.getLogger("uda_plugins.active_learning_round")

PENDING_EXIT_CODE = 3


def score_images(cfg, dataset: str, network_name: str, batch_size: int) -> np.ndarray:
    """The image entropy of every image of ``dataset`` under the trained network."""
    network = load_network(cfg, network_name)
    loader = build_full_view_loader(cfg, dataset, batch_size)
    scores = np.zeros(len(loader.dataset))
    with tqdm(total=len(scores), desc=f"scoring {dataset}", unit="img", disable=None) as progress:
        for indices, probs in predict_full_views(network, loader, network.normalize, cfg.UDA.ACTIVE.SCORE_INPUT_SIZE):
            scores[indices] = image_entropy(probs).cpu().numpy()
            progress.update(len(indices))
    return scores


def run_round(args, cfg) -> dict:
    dataset = args.dataset or (cfg.DATASETS.TARGET_TRAIN[0] if cfg.DATASETS.TARGET_TRAIN else "")
    if not dataset:
        raise ValueError("No --dataset and DATASETS.TARGET_TRAIN is empty")
    dicts = get_dataset_dicts([dataset])
    spec = args.labelled if args.labelled is not None else cfg.DATASETS.TARGET_LABELED_LIST
    if spec.startswith("random:") and cfg.SEED < 0:
        raise ValueError(f"'{spec}' with SEED < 0 cannot be reproduced: pass the labelled images as a list file")
    labelled_indices = image_subset(spec, dicts, cfg.SEED) if spec else []
    labelled = np.zeros(len(dicts), dtype=bool)
    labelled[labelled_indices] = True
    round_index = 1 + int(bool(spec))
    if spec and os.path.isfile(spec + ".round.json"):
        with open(spec + ".round.json") as f:
            round_index = json.load(f)["round"] + 1
    scores = None
    if args.strategy != "random":
        with torch.no_grad():
            scores = score_images(cfg, dataset, args.network, args.batch_size)
    groups = [group_of(d["file_name"]) for d in dicts]
    picked = select_images(
        args.num, groups, labelled, args.strategy, scores, np.random.default_rng(args.seed), args.quota_rule
    )
    if args.annotator == "folder":
        if not args.label_folder:
            raise ValueError("--annotator folder needs --label-folder")
        annotator = FolderAnnotator(
            args.label_folder, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        )
        if not os.path.isfile(annotator.request_file(round_index)):
            annotator.request(round_index, dicts, picked)
        else:  # a re-run waiting for labels asks for the images it asked for before
            picked = read_image_list(annotator.request_file(round_index), dicts)
    else:
        annotator = GroundTruthAnnotator()
    labels = annotator.labels(round_index, dicts, picked)
    write_image_list(args.output, dicts, labelled_indices + picked)
    keys = image_keys(dicts)
    if scores is not None:
        with open(args.output + ".scores.tsv", "w") as f:
            f.write("score\timage\n")
            f.writelines(f"{scores[i]:.6f}\t{keys[i]}\n" for i in np.argsort(-scores, kind="stable"))
    summary = {
        "round": round_index,
        "dataset": dataset,
        "weights": cfg.MODEL.WEIGHTS,
        "strategy": args.strategy,
        "labelled_before": len(labelled_indices),
        "labelled_after": len(labelled_indices) + len(picked),
        "new_images": [keys[i] for i in picked],
        "new_per_group": {g: sum(groups[i] == g for i in picked) for g in dict.fromkeys(groups)},
        "label_files": {keys[i]: labels[i] for i in picked},
    }
    with open(args.output + ".round.json", "w") as f:
        json.dump(summary, f, indent=1)
    logger.info(
        "Round %d: %d new images (%s), %d labelled in all; list written to %s",
        round_index,
        len(picked),
        args.strategy,
        summary["labelled_after"],
        args.output,
    )
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--num", type=int, required=True, help="images to add in this round")
    parser.add_argument("--output", required=True, help="the grown list file")
    parser.add_argument(
        "--labelled", default=None, help="images labelled so far: a list file or random:<n> (default: the config's)"
    )
    parser.add_argument("--dataset", default="", help="a registered dataset (default: DATASETS.TARGET_TRAIN[0])")
    parser.add_argument("--strategy", default="entropy", help="entropy (the authors') or random")
    parser.add_argument("--quota-rule", default="largest_remainder", help="largest_remainder or reference")
    parser.add_argument("--annotator", default="ground_truth", choices=("ground_truth", "folder"))
    parser.add_argument("--label-folder", default="", help="where people put the labels (--annotator folder)")
    parser.add_argument("--network", default="teacher", help="teacher (the authors') or student")
    parser.add_argument("--seed", type=int, default=0, help="random strategy's seed")
    parser.add_argument("--batch-size", type=int, default=2, help="images per forward")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS")
    args = parser.parse_args(argv)
    setup_logger(name="uda_plugins")
    try:
        run_round(args, load_frozen_cfg(args.config_file, args.opts))
    except AnnotationPending as e:
        print(f"active_learning_round.py: waiting for labels: {e}", file=sys.stderr)
        return PENDING_EXIT_CODE
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        return print_error("active_learning_round.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
