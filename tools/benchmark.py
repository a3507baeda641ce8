#!/usr/bin/env python
"""Training speed and memory of a config, measured on its real data pipeline.

    python tools/benchmark.py --config-file configs/synthetic/source_only.yaml [--iters 100] [KEY VALUE ...]

Prints two tables. The first: seconds per iteration (median and mean over the timed iterations), the part spent
waiting for data, images per second (all domains), peak host memory (RSS) and peak device memory. The second: the
mean time per iteration of each named section of the step (``uda_plugins.utils.profiling.timed``: data wait,
teacher forward, student forwards with their losses, backward, optimizer, mixing/masking/augmentation, EMA) and
the "adaptation machinery" share = everything that is not a network forward/backward or the optimizer. The third:
host memory (RSS) at evenly spaced timed iterations and its change — it must stay flat (dataset dicts
are serialised once; nothing may accumulate per iteration). Sections synchronise the device, which slows a GPU run
slightly. The training hooks run as in training (EMA updates
included); nothing is written except a throw-away OUTPUT_DIR in a temporary folder; no evaluation runs.
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
from tabulate import tabulate

import uda_plugins  # noqa: F401  (registration)
from uda_plugins.d2 import EventStorage
from uda_plugins.engine import UDATrainer
from uda_plugins.engine.setup import load_cfg, set_determinism
from uda_plugins.utils.profiling import collect_timings

# Sections that are network compute; the rest of the step is adaptation machinery or bookkeeping.
NETWORK_SECTIONS = ("student_forward", "teacher_forward", "backward", "optimizer")


def build_cfg(args, output_dir):
    cfg, warning = load_cfg(args.config_file, args.opts)
    if warning:
        print(warning, file=sys.stderr)
    cfg.OUTPUT_DIR = output_dir
    cfg.TEST.EVAL_PERIOD = 0
    cfg.VIS_PERIOD = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9
    cfg.SOLVER.MAX_ITER = max(cfg.SOLVER.MAX_ITER, args.warmup + args.iters)
    cfg.freeze()
    set_determinism(cfg)  # DETERMINISTIC True measures its cost
    return cfg


def current_rss_mib() -> float:
    """This process's resident memory now (Linux /proc; the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_table(samples: list) -> str:
    """RSS at the sampled iterations and the change from the first sample to the last (allocator noise is some
    MiB either way; a leak shows as steady growth over a long run, e.g. ``--iters 1000``)."""
    rows = [[i, f"{m:.0f}"] for i, m in samples]
    (first_it, first), (last_it, last) = samples[0], samples[-1]
    return tabulate(rows, headers=["iteration", "RSS MiB"], tablefmt="github") + (
        f"\nRSS change from iteration {first_it} to {last_it}: {last - first:+.0f} MiB"
    )


def images_per_iteration(cfg, trainer) -> int:
    req = type(trainer.model).data_requirements
    n = cfg.SOLVER.IMS_PER_BATCH_SOURCE if req.source else 0
    if req.target:
        n += cfg.SOLVER.IMS_PER_BATCH_TARGET * len(cfg.DATASETS.TARGET_TRAIN)
    return n


def breakdown_table(sections: dict, step_times: list) -> str:
    """Mean seconds per iteration of each section, its share of the step, and the machinery total."""
    n = len(step_times)
    step = sum(step_times) / n
    per_it = {k: v / n for k, v in sections.items()}
    per_it["other (hooks, metrics, host<->device)"] = step - sum(per_it.values())
    machinery = sum(v for k, v in per_it.items() if k not in NETWORK_SECTIONS and k != "data_wait")
    rows = [[k, f"{v:.4f}", f"{100 * v / step:.1f}%"] for k, v in sorted(per_it.items(), key=lambda kv: -kv[1])]
    rows.append(["adaptation machinery (not network, not data)", f"{machinery:.4f}", f"{100 * machinery / step:.1f}%"])
    return tabulate(rows, headers=["section", "s/it", "share of step"], tablefmt="github")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=50, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config_file):
        parser.error(f"Config file '{args.config_file}' does not exist")

    with tempfile.TemporaryDirectory(prefix="uda_benchmark_") as output_dir:
        cfg = build_cfg(args, output_dir)
        torch.manual_seed(0)
        trainer = UDATrainer(cfg)
        cuda = cfg.MODEL.DEVICE.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step_times, data_times = [], []
        sections = {}
        total = args.warmup + args.iters
        rss_at = {args.warmup + round(k * (args.iters - 1) / 4) for k in range(5)}
        rss_samples = []
        with EventStorage(0) as storage:
            trainer.storage = storage
            trainer.before_train()
            for it in range(total):
                storage.iter = trainer.iter = it
                with collect_timings() as timings:
                    start = time.perf_counter()
                    trainer.before_step()
                    trainer.run_step()
                    trainer.after_step()
                    if cuda:
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - start
                if it >= args.warmup:
                    step_times.append(elapsed)
                    data_times.append(storage.history("data_time").latest())
                    timings["data_wait"] = data_times[-1]
                    for k, v in timings.items():
                        sections[k] = sections.get(k, 0.0) + v
                if it in rss_at:
                    rss_samples.append((it, current_rss_mib()))
        sec = statistics.median(step_times)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows = [
            [
                os.path.basename(args.config_file),
                cfg.MODEL.DEVICE,
                f"{sec:.4f}",
                f"{statistics.mean(step_times):.4f}",
                f"{statistics.median(data_times):.4f}",
                f"{images_per_iteration(cfg, trainer) / sec:.1f}",
                f"{rss_mb:.0f}",
                f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if cuda else "-",
            ]
        ]
        print(
            tabulate(
                rows,
                headers=[
                    "config",
                    "device",
                    "s/it (median)",
                    "s/it (mean)",
                    "data s/it",
                    "img/s",
                    "peak RSS MiB",
                    "peak device MiB",
                ],
                tablefmt="github",
            )
        )
        print(f"({args.iters} timed iterations after {args.warmup} warm-up; torch threads: {torch.get_num_threads()})")
        print()
        print(breakdown_table(sections, step_times))
        print()
        print(rss_table(rss_samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
