#!/usr/bin/env python
"""Train configs over several seeds and compare them on the target: mean +- std mIoU, per-class IoU, gap closed.

    python tools/adaptation_benchmark.py --configs configs/synthetic/source_only.yaml \\
        configs/synthetic/target_only.yaml [more methods ...] --seeds 0 1 2 [--jobs 2] [KEY VALUE ...]

Every (config, seed) run is ``tools/train_net.py --config-file <config> SEED <seed> OUTPUT_DIR
<output-dir>/<config name>/seed<seed>``; a run whose final evaluation already exists is not repeated, so the
command can be re-run to resume a sweep. Reported numbers are the **last** evaluation of each run (no checkpoint
selection on the target). "gap closed" = (method - source-only) / (oracle - source-only), from the means; it needs
one SourceOnly and one TargetOnly config among ``--configs``. A markdown copy of the tables is written to
``<output-dir>/results.md``.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import yaml
from tabulate import tabulate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_name(config: str) -> str:
    return os.path.splitext(os.path.basename(config))[0]


def final_metrics(run_dir: str):
    """The last evaluation of a finished run (its first test set), or None."""
    metrics_file = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(os.path.join(run_dir, "model_final.pth")) or not os.path.isfile(metrics_file):
        return None
    inference = os.path.join(run_dir, "inference")
    sets = sorted(os.listdir(inference)) if os.path.isdir(inference) else []
    if not sets:
        return None
    with open(os.path.join(inference, sets[0], "sem_seg_evaluation.json")) as f:
        return json.load(f)["metrics"]


def meta_architecture(run_dir: str) -> str:
    with open(os.path.join(run_dir, "config.yaml")) as f:
        return yaml.safe_load(f)["MODEL"]["META_ARCHITECTURE"]


def train(config: str, seed: int, run_dir: str, opts, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "train_net.py"),
        "--config-file",
        config,
        "SEED",
        str(seed),
        "OUTPUT_DIR",
        run_dir,
    ] + list(opts)
    start = time.time()
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "stdout.txt"), "w") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}); see {run_dir}/stdout.txt")
    return time.time() - start


def fmt(values) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output-dir", default="output/adaptation_benchmark")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (threads per run = cores / jobs)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    args = parser.parse_args(argv)
    for c in args.configs:
        if not os.path.isfile(c):
            parser.error(f"Config file '{c}' does not exist")

    runs = [(c, s, os.path.join(args.output_dir, run_name(c), f"seed{s}")) for c in args.configs for s in args.seeds]
    todo = [r for r in runs if final_metrics(r[2]) is None]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already done, {args.jobs} at a time x {threads} threads")
    durations = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(train, c, s, d, args.opts, threads): (c, s) for c, s, d in todo}
        for future, (c, s) in futures.items():
            durations[(c, s)] = future.result()
            print(f"  {run_name(c)} seed {s}: {durations[(c, s)] / 60:.1f} min")

    results = {}  # name -> list of metric dicts
    kinds = {}
    for c, _, d in runs:
        results.setdefault(run_name(c), []).append(final_metrics(d))
        kinds[run_name(c)] = meta_architecture(d)
    names = list(results)
    source = next((n for n in names if kinds[n] == "SourceOnly"), None)
    oracle = next((n for n in names if kinds[n] == "TargetOnly"), None)
    mean = {n: float(np.mean([m["mIoU"] for m in results[n]])) for n in names}

    rows = []
    for n in names:
        gap = "-"
        if source and oracle and n not in (source, oracle) and mean[oracle] != mean[source]:
            gap = f"{100 * (mean[n] - mean[source]) / (mean[oracle] - mean[source]):.0f}%"
        elif n == source:
            gap = "0%"
        elif n == oracle:
            gap = "100%"
        rows.append([n, fmt([m["mIoU"] for m in results[n]]), " / ".join(f"{m['mIoU']:.1f}" for m in results[n]), gap])
    summary = tabulate(rows, headers=["method", "mIoU (mean ± std)", "per seed", "gap closed"], tablefmt="github")

    class_names = [k[len("IoU-") :] for k in results[names[0]][0] if k.startswith("IoU-")]
    present = [c for c in class_names if not all(math.isnan(m[f"IoU-{c}"]) for n in names for m in results[n])]
    per_class = tabulate(
        [[n] + [fmt([m[f"IoU-{c}"] for m in results[n]]) for c in present] for n in names],
        headers=["method"] + present,
        tablefmt="github",
    )
    text = (
        f"Seeds {args.seeds}; last evaluation of each run on its first test set.\n\n{summary}\n\n"
        f"Per-class IoU (mean ± std over seeds):\n\n{per_class}\n"
    )
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
