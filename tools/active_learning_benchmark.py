#!/usr/bin/env python
"""mIoU against the number of labelled target images, per selection strategy, over seeds.

    python tools/active_learning_benchmark.py --configs configs/synthetic/stal_rounds_entropy.yaml \\
        configs/synthetic/stal_rounds_random.yaml --seeds 0 1 2 --jobs 2

Each config is a run with active-learning rounds inside it (``UDA.ACTIVE.*``). Runs are trained like
``tools/adaptation_benchmark.py`` (``<output-dir>/<config name>/seed<seed>``, finished runs reused). From each run's
``metrics.json`` every evaluation on the first test set is paired with the number of labelled target images the
model had been trained with (the seed set, then the pool after each earlier round; an evaluation in the iteration of
a round comes before the round's images are used). Prints the table (mean ± std over seeds per config and count) and
writes it with a PNG chart to ``<output-dir>/active_learning.{md,png}``.
"""

import json
import os
import sys

import cv2
import numpy as np
import yaml
from tabulate import tabulate

from uda_plugins.engine.sweep import mean_std, parse_sweep_args, plan_runs, run_all
from uda_plugins.utils.file_io import atomic_write_text
from uda_plugins.utils.visualization import line_chart


def labelled_curve(run_dir: str) -> dict:
    """{labelled images: mIoU} of one run: its evaluations (the final one at the last count) on DATASETS.TEST[0]."""
    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    spec = cfg["DATASETS"]["TARGET_LABELED_LIST"]
    if spec.startswith("random:"):
        seed_set = int(spec.split(":", 1)[1])
    else:
        with open(spec) as f:
            seed_set = sum(1 for line in f if line.strip())
    tests = cfg["DATASETS"]["TEST"]
    key = "sem_seg/mIoU" if len(tests) == 1 else f"{tests[0]}/sem_seg/mIoU"
    rounds, evaluations = [], []
    with open(os.path.join(run_dir, "metrics.json")) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if "active/labelled_images" in record:
                rounds.append((record["iteration"], record["active/labelled_images"]))
            if key in record:
                evaluations.append((record["iteration"], record[key]))
    curve = {}
    for iteration, miou in evaluations:
        count = max([n for it, n in rounds if it < iteration], default=seed_set)
        curve[int(count)] = miou  # the last evaluation at a count wins (the final one)
    return curve


def main(argv=None) -> int:
    args = parse_sweep_args(argv, __doc__, "output/active_learning_benchmark")
    runs = plan_runs(args.configs, args.seeds, args.output_dir)
    run_all(runs, args.opts, args.jobs)
    curves = {}
    for run in runs:
        for count, miou in labelled_curve(run.output_dir).items():
            curves.setdefault(run.name, {}).setdefault(count, []).append(miou)
    counts = sorted({c for curve in curves.values() for c in curve})
    rows = [[name] + [mean_std(curve.get(c, [])) for c in counts] for name, curve in curves.items()]
    table = tabulate(rows, headers=["config"] + [f"{c} labelled" for c in counts], tablefmt="github")
    text = f"Seeds {args.seeds}; mIoU (mean ± std) on the first test set against labelled target images.\n\n{table}\n"
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.output_dir, "active_learning.md"), text)
    series = {
        name: (
            [c for c in counts if c in curve],
            [np.mean(curve[c]) for c in counts if c in curve],
            [np.std(curve[c]) for c in counts if c in curve],
        )
        for name, curve in curves.items()
    }
    chart = line_chart(series, "labelled target images", "mIoU")
    cv2.imwrite(os.path.join(args.output_dir, "active_learning.png"), cv2.cvtColor(chart, cv2.COLOR_RGB2BGR))
    return 0


if __name__ == "__main__":
    sys.exit(main())
