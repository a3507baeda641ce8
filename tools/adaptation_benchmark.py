#!/usr/bin/env python
"""Train configs over several seeds and compare them on the target: mean +- std mIoU, per-class IoU, gap closed.

    python tools/adaptation_benchmark.py --configs configs/synthetic/source_only.yaml \\
        configs/synthetic/target_only.yaml [more methods ...] --seeds 0 1 2 [--jobs 2] [KEY VALUE ...]

Runs are those of ``tools/seed_sweep.py`` (``uda_plugins.engine.sweep``): ``<output-dir>/<config name>/seed<seed>``,
finished runs kept, so the command can be re-run to resume a sweep. Reported numbers are the **last** evaluation of
each run (no checkpoint selection on the target). "gap closed" = (method - source-only) / (oracle - source-only),
from the means; it needs one SourceOnly and one TargetOnly config among ``--configs``. Classes that collapsed in a
seed are listed. A markdown copy of the tables is written to ``<output-dir>/results.md``.
"""

import os
import sys

import numpy as np
from tabulate import tabulate

from uda_plugins.engine.sweep import (
    class_names,
    collapsed_classes,
    mean_std,
    meta_architecture,
    parse_sweep_args,
    plan_runs,
    run_all,
)
from uda_plugins.utils.file_io import atomic_write_text


def main(argv=None) -> int:
    args = parse_sweep_args(argv, __doc__, "output/adaptation_benchmark")

    runs = plan_runs(args.configs, args.seeds, args.output_dir)
    finished = run_all(runs, args.opts, args.jobs)
    results = {}  # name -> {seed: metrics}
    kinds = {}
    for r in runs:
        results.setdefault(r.name, {})[r.seed] = finished[r]
        kinds[r.name] = meta_architecture(r.output_dir)
    names = list(results)
    source = next((n for n in names if kinds[n] == "SourceOnly"), None)
    oracle = next((n for n in names if kinds[n] == "TargetOnly"), None)
    miou = {n: [m["mIoU"] for m in results[n].values()] for n in names}
    mean = {n: float(np.mean(miou[n])) for n in names}

    rows = []
    for n in names:
        gap = "-"
        if source and oracle and n not in (source, oracle) and mean[oracle] != mean[source]:
            gap = f"{100 * (mean[n] - mean[source]) / (mean[oracle] - mean[source]):.0f}%"
        elif n == source:
            gap = "0%"
        elif n == oracle:
            gap = "100%"
        rows.append([n, mean_std(miou[n]), " / ".join(f"{v:.1f}" for v in miou[n]), gap])
    summary = tabulate(rows, headers=["method", "mIoU (mean ± std)", "per seed", "gap closed"], tablefmt="github")

    present = class_names([m for n in names for m in results[n].values()])
    per_class = tabulate(
        [[n] + [mean_std([m[f"IoU-{c}"] for m in results[n].values()]) for c in present] for n in names],
        headers=["method"] + present,
        tablefmt="github",
    )
    collapsed = [
        f"- {n}: {c} in seed {s} (IoU {v:.1f}, mean {m:.1f})"
        for n in names
        for c, s, v, m in collapsed_classes(results[n])
    ]
    text = (
        f"Seeds {args.seeds}; last evaluation of each run on its first test set.\n\n{summary}\n\n"
        f"Per-class IoU (mean ± std over seeds):\n\n{per_class}\n"
        + ("\nCollapsed classes (IoU < 1 in a seed, mean > 20):\n" + "\n".join(collapsed) + "\n" if collapsed else "")
    )
    print(text)
    atomic_write_text(os.path.join(args.output_dir, "results.md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
