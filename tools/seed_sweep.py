#!/usr/bin/env python
"""Train one config over several seeds and show how much the result depends on the seed.

    python tools/seed_sweep.py --config-file configs/synthetic/dacs.yaml --seeds 0 1 2 [--jobs 2] [KEY VALUE ...]

Runs go to ``<output-dir>/<config name>/seed<seed>`` (re-running the command resumes the sweep; finished runs are
kept), ``--jobs`` of them at a time in parallel processes sharing the cores. Prints mIoU mean ± std and per seed,
then per class mean ± std, min and max with their seeds, and flags **collapsed** classes — IoU < 1 in a seed while
the mean over seeds is > 20, the silent failure of self-training that a mean hides. The tables are also written
to ``<output-dir>/<config name>/sweep.md``.
"""

import os
import sys

from tabulate import tabulate

from uda_plugins.engine.sweep import (
    collapsed_classes,
    mean_std,
    parse_sweep_args,
    per_class_range_table,
    plan_runs,
    run_all,
)
from uda_plugins.utils.file_io import atomic_write_text


def main(argv=None) -> int:
    args = parse_sweep_args(argv, __doc__, "output/seed_sweep", single_config=True)

    runs = plan_runs(args.configs, args.seeds, args.output_dir)
    metrics = {r.seed: m for r, m in run_all(runs, args.opts, args.jobs).items()}
    miou = [m["mIoU"] for m in metrics.values()]
    summary = tabulate(
        [[runs[0].name, mean_std(miou), " / ".join(f"{v:.1f}" for v in miou), f"{min(miou):.1f}", f"{max(miou):.1f}"]],
        headers=["config", "mIoU (mean ± std)", f"per seed {args.seeds}", "min", "max"],
        tablefmt="github",
    )
    collapsed = collapsed_classes(metrics)
    flags = "\n".join(f"COLLAPSED: {c} in seed {s}: IoU {v:.1f} (mean {mean:.1f})" for c, s, v, mean in collapsed)
    text = f"{summary}\n\nPer class over seeds:\n\n{per_class_range_table(metrics)}\n" + (
        f"\n{flags}\n" if flags else ""
    )
    print(text)
    atomic_write_text(os.path.join(args.output_dir, runs[0].name, "sweep.md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
