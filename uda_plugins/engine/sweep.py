"""Running configs over seeds and summarising the runs: what ``tools/seed_sweep.py``,
``tools/adaptation_benchmark.py`` and ``tools/active_learning_benchmark.py`` share, their command line included.

Every (config, seed) run is ``tools/train_net.py --config-file <config> SEED <seed> OUTPUT_DIR <root>/<config
name>/seed<seed>`` in its own process; a run whose final evaluation already exists is not repeated, so a sweep can
be re-run to resume it. ``{seed}`` in an override is replaced by the run's seed, so a run can start from the same
seed's run of an earlier stage (``MODEL.WEIGHTS output/adaptation_benchmark/mcl_warmup/seed{seed}/model_final.pth``).
A run's result is its **last** evaluation on its first test set (no checkpoint selection on target labels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml
from tabulate import tabulate

__all__ = [
    "parse_sweep_args",
    "Run",
    "plan_runs",
    "final_metrics",
    "meta_architecture",
    "run_all",
    "mean_std",
    "class_names",
    "collapsed_classes",
    "per_class_range_table",
]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A class "collapsed" in a seed when its IoU is below COLLAPSE_IOU while its mean over seeds is above
# COLLAPSE_MEAN: the failure mode of self-training that a mean hides (anchors.md §5).
COLLAPSE_IOU = 1.0
COLLAPSE_MEAN = 20.0


def parse_sweep_args(
    argv: Optional[Sequence[str]], description: str, default_output_dir: str, single_config: bool = False
) -> argparse.Namespace:
    """The command line every sweep tool shares: ``--configs`` (or one ``--config-file``), ``--seeds``,
    ``--output-dir``, ``--jobs`` and ``KEY VALUE`` overrides. ``args.configs`` is the list of config files, each
    checked to exist."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if single_config:
        parser.add_argument("--config-file", required=True)
    else:
        parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output-dir", default=default_output_dir)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (threads per run = cores / jobs)")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run ({seed} = the run's seed)"
    )
    args = parser.parse_args(argv)
    if single_config:
        args.configs = [args.config_file]
    for c in args.configs:
        if not os.path.isfile(c):
            parser.error(f"Config file '{c}' does not exist")
    return args


@dataclass(frozen=True)
class Run:
    config: str
    seed: int
    output_dir: str

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.config))[0]


def plan_runs(configs: Sequence[str], seeds: Sequence[int], root: str) -> List[Run]:
    return [
        Run(c, s, os.path.join(root, os.path.splitext(os.path.basename(c))[0], f"seed{s}"))
        for c in configs
        for s in seeds
    ]


def final_metrics(run_dir: str) -> Optional[dict]:
    """The last evaluation of a finished run on its first test set (``DATASETS.TEST[0]`` of the run's config), or
    None."""
    if not os.path.isfile(os.path.join(run_dir, "model_final.pth")):
        return None
    with open(os.path.join(run_dir, "config.yaml")) as f:
        tests = yaml.safe_load(f)["DATASETS"]["TEST"]
    if not tests:
        return None
    path = os.path.join(run_dir, "inference", tests[0], "sem_seg_evaluation.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["metrics"]


def meta_architecture(run_dir: str) -> str:
    with open(os.path.join(run_dir, "config.yaml")) as f:
        return yaml.safe_load(f)["MODEL"]["META_ARCHITECTURE"]


def _train(run: Run, opts: Sequence[str], threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    train_net = os.path.join(REPO, "tools", "train_net.py")
    cmd = [sys.executable, train_net, "--config-file", run.config, "SEED", str(run.seed), "OUTPUT_DIR", run.output_dir]
    cmd += [o.replace("{seed}", str(run.seed)) for o in opts]
    start = time.time()
    os.makedirs(run.output_dir, exist_ok=True)
    with open(os.path.join(run.output_dir, "stdout.txt"), "w") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}); see {run.output_dir}/stdout.txt")
    return time.time() - start


def run_all(
    runs: Sequence[Run], opts: Sequence[str] = (), jobs: int = 1, report: Callable[[str], None] = print
) -> Dict[Run, dict]:
    """Train the runs without a final evaluation (``jobs`` at a time, the cores shared between them) and return
    every run's final metrics."""
    todo = [r for r in runs if final_metrics(r.output_dir) is None]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    report(f"{len(runs)} runs, {len(runs) - len(todo)} already done, {jobs} at a time x {threads} threads")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_train, r, opts, threads): r for r in todo}
        for future, r in futures.items():
            report(f"  {r.name} seed {r.seed}: {future.result() / 60:.1f} min")
    return {r: final_metrics(r.output_dir) for r in runs}


def mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def class_names(metrics: Sequence[dict]) -> List[str]:
    """The classes with an IoU in any of ``metrics`` (classes absent from the test set are NaN everywhere)."""
    names = [k[len("IoU-") :] for k in metrics[0] if k.startswith("IoU-")]
    return [c for c in names if not all(math.isnan(m[f"IoU-{c}"]) for m in metrics)]


def collapsed_classes(metrics_per_seed: Dict[int, dict]) -> List[Tuple[str, int, float, float]]:
    """(class, seed, IoU, mean IoU) for every class whose IoU in a seed is < COLLAPSE_IOU while its mean over the
    seeds is > COLLAPSE_MEAN."""
    out = []
    for c in class_names(list(metrics_per_seed.values())):
        values = {s: m[f"IoU-{c}"] for s, m in metrics_per_seed.items() if not math.isnan(m[f"IoU-{c}"])}
        mean = float(np.mean(list(values.values())))
        out += [(c, s, v, mean) for s, v in values.items() if v < COLLAPSE_IOU and mean > COLLAPSE_MEAN]
    return out


def per_class_range_table(metrics_per_seed: Dict[int, dict]) -> str:
    """Per class: mean ± std, min (seed), max (seed), and a flag where a seed collapsed."""
    collapsed = {c for c, *_ in collapsed_classes(metrics_per_seed)}
    rows = []
    for c in class_names(list(metrics_per_seed.values())):
        values = {s: m[f"IoU-{c}"] for s, m in metrics_per_seed.items() if not math.isnan(m[f"IoU-{c}"])}
        lo, hi = min(values, key=values.get), max(values, key=values.get)
        rows.append(
            [
                c,
                mean_std(list(values.values())),
                f"{values[lo]:.1f} (seed {lo})",
                f"{values[hi]:.1f} (seed {hi})",
                "COLLAPSED" if c in collapsed else "",
            ]
        )
    return tabulate(rows, headers=["class", "IoU mean ± std", "min", "max", ""], tablefmt="github")
