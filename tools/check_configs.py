#!/usr/bin/env python
"""Train shipped configs for a few iterations on fabricated data at the real datasets' shapes.

    python tools/check_configs.py                                   # every paper config (about 40 minutes on 2 cores)
    python tools/check_configs.py configs/multi_target/mcl_gta5_to_cs_map_idd_7cls.yaml [more configs]
    python tools/check_configs.py --output docs/config_check.md --workdir /tmp/check --keep

In a temporary folder (``--workdir``), this fabricates a few images of every dataset in its documented raw layout
and at its real resolutions and aspect ratios (uda_plugins/data/datasets/fabricate.py: GTA5 1914x1052 with a frame
whose label is taller, Cityscapes 2048x1024, SYNTHIA 1280x760 with 16-bit labels, IDD 1920x1080 and 1280x720,
Mapillary v1.2 from 4:3 to 16:9 at up to 4000 px), runs the prepare tools on it, then trains each config for
``--iters`` iterations and evaluates it on the one validation image of each test set, as
``python tools/train_net.py --config-file <config>`` in that folder (the configs' relative paths resolve there).

Only the network shrinks: the smallest backbone of its family (MiT-B0; a ResNet-18 with 8..32 channels and one
block per stage), narrow heads, no pretrained files; every data shape stays the config's own (resizes, scales,
crops, batch sizes, evaluation windows). The phases a method starts later run from the second iteration
(QuadMix's four-way mixing, STAL's contrastive term, DUDA's bank rewrites, MCL's pseudo-label refresh), so that
their code sees the real shapes too. Two-stage protocols are chained as the README tells users: a config whose
``MODEL.WEIGHTS`` another config writes (MCL's self-training) runs after it; DUDA starts from a source-only warm-up
of its own network and the initial bank of ``tools/generate_pseudo_labels.py``; STAL's labelled lists come from
``tools/convert_ilm_assl_list.py`` on a list in the authors' format.

Prints a table: config, pass or the one-line error, the seconds per iteration of the shrunk network (the last
iteration: the first includes the start-up) and the seconds of the whole run (its prerequisites included).
Exit code 0 when every config passes.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from tabulate import tabulate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from uda_plugins.data.datasets.fabricate import REAL_SIZES, fabricate_datasets  # noqa: E402
from uda_plugins.engine.preflight import config_writing  # noqa: E402
from uda_plugins.engine.setup import load_cfg  # noqa: E402

PAPER_CONFIG_FOLDERS = ("gta5_cityscapes", "synthia_cityscapes", "multi_target")

# The later phases, from the second iteration (iteration 0 runs the first phase).
PHASES_FROM_THE_SECOND_ITERATION = {
    "UDA.QUADMIX.START_ITER": 1,
    "UDA.STAL.CONTRASTIVE_START_ITER": 1,
    "UDA.DUDA.UPDATE_START": 1,
    "UDA.DUDA.ALPHA_RAMP_START": 0,
    "UDA.DUDA.BETA_RAMP_START": 0,
    "UDA.MCL.REFRESH_PERIOD": 2,  # soft pseudo-labels remade before iteration 1
}


# DUDA's warm-up: its own network trained on the source alone (the README's recipe).
DUDA_WARMUP = {"MODEL.META_ARCHITECTURE": "SourceOnly", "TEST.EVAL_MODEL": "student"}


def paper_configs() -> List[str]:
    """Every trainable config of the paper benchmarks (not the Base-* building blocks)."""
    out = []
    for folder in PAPER_CONFIG_FOLDERS:
        out += sorted(
            p
            for p in glob.glob(os.path.join(REPO, "configs", folder, "*.yaml"))
            if not os.path.basename(p).startswith("Base-")
        )
    return out


def shrink_overrides(cfg) -> Dict[str, object]:
    """The smallest network of the config's family, without pretrained files; the data untouched."""
    out: Dict[str, object] = {"MODEL.BACKBONE.PRETRAINED": ""}
    if cfg.MODEL.BACKBONE.NAME == "build_mit_backbone":
        out["MODEL.TIMM.ARCH"] = "mit_b0"
    else:
        out.update(
            {
                "MODEL.TIMM.ARCH": "resnet18",
                "MODEL.TIMM.CHANNELS": "(8, 16, 24, 32)",
                "MODEL.TIMM.LAYERS": f"(1, 1, 1, {max(1, len(cfg.MODEL.TIMM.MULTI_GRID))})",
                "MODEL.TIMM.STEM_WIDTH": 8,
            }
        )
    out.update(
        {
            "MODEL.SEM_SEG_HEAD.EMBED_DIM": 16,
            "MODEL.SEM_SEG_HEAD.CONVS_DIM": 16,
            "MODEL.HRDA.ATTENTION_EMBED_DIM": 16,
            "UDA.GUIDANCE.EMBED_DIM": 16,
            "UDA.GUIDANCE.NUM_HEADS": 2,
            "UDA.GUIDANCE.DEPTH": 1,
            "UDA.MCL.DISCRIMINATOR_WIDTH": 8,
        }
    )
    return out


def short_run_overrides(iters: int) -> Dict[str, object]:
    # MODEL.DEVICE stays the config's: on a machine without a GPU it falls back to the CPU as for any user.
    return {
        "SOLVER.MAX_ITER": iters,
        "SOLVER.CHECKPOINT_PERIOD": 10**6,  # model_final only
        "TEST.EVAL_PERIOD": iters,
        "VIS_PERIOD": max(iters - 1, 1),  # the pictures of one iteration at the real sizes, not in the timed last one
        "DATALOADER.NUM_WORKERS": 0,
        **PHASES_FROM_THE_SECOND_ITERATION,
    }


def _flat(overrides: Dict[str, object]) -> List[str]:
    out: List[str] = []
    for key, value in overrides.items():
        out += [key, str(value)]
    return out


@dataclass
class Step:
    """One command of a check, run in the work folder."""

    argv: List[str]
    log: str
    output_dir: str = ""  # a training run's OUTPUT_DIR (relative to the work folder)


@dataclass
class Check:
    config: str
    steps: List[Step] = field(default_factory=list)
    result: str = ""
    seconds_per_iter: Optional[float] = None
    seconds: float = 0.0


class Workspace:
    """The work folder: fabricated datasets (prepared), lists, and where every run writes."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.datasets = os.path.join(self.root, "datasets")
        self.logs = os.path.join(self.root, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.env = dict(os.environ, UDA_DATASETS=self.datasets, PYTHONPATH=REPO)

    def run(self, argv: List[str], log: str) -> subprocess.CompletedProcess:
        with open(os.path.join(self.logs, log), "w") as f:
            return subprocess.run(argv, cwd=self.root, env=self.env, stdout=f, stderr=subprocess.PIPE, text=True)

    def prepare(self) -> None:
        """Fabricate every dataset and run its prepare tool on it, as datasets/README.md tells users (the tools'
        own ``main``, in this process: the same code without an interpreter's start-up per dataset)."""
        fabricate_datasets(self.datasets)
        for name in REAL_SIZES:
            tool = runpy.run_path(os.path.join(REPO, "tools", f"prepare_{name}.py"), run_name="prepare_tool")["main"]
            with open(os.path.join(self.logs, f"prepare_{name}.log"), "w") as log:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    code = tool(["--root", os.path.join(self.datasets, name)])
            if code:
                raise RuntimeError(f"prepare_{name}.py failed: see {os.path.join(self.logs, f'prepare_{name}.log')}")

    def ilm_assl_lists(self, cfg) -> None:
        """STAL's labelled lists, as its config comments say: the authors' labeled.txt format (the source renamed into
        the Cityscapes tree, then Cityscapes images) through tools/convert_ilm_assl_list.py."""
        target_out = cfg.DATASETS.TARGET_LABELED_LIST
        if not target_out or target_out.startswith("random:") or os.path.isfile(os.path.join(self.root, target_out)):
            return
        source = cfg.DATASETS.SOURCE_TRAIN[0].split("_")[0]  # gta5 / synthia
        source_line = {"gta5": "gta5/gta5_00001", "synthia": "synthia/synthia_0000000"}[source]
        authors = os.path.join(self.root, "ilm_assl_lists", os.path.basename(target_out))
        os.makedirs(os.path.dirname(authors), exist_ok=True)
        with open(authors, "w") as f:
            f.write(f"leftImg8bit/train/{source_line}_000019_leftImg8bit.png\n")
            f.write("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png\n")
            f.write("leftImg8bit/train/bochum/bochum_000001_000019_leftImg8bit.png\n")
        argv = [sys.executable, os.path.join(REPO, "tools", "convert_ilm_assl_list.py"), authors]
        argv += [
            "--source-out",
            os.path.join(os.path.dirname(target_out), "source_2000.txt"),
            "--target-out",
            target_out,
        ]
        done = self.run(argv, f"convert_{os.path.basename(target_out)}.log")
        if done.returncode:
            raise RuntimeError(f"convert_ilm_assl_list.py failed: {_last_error(done.stderr)}")


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if ": error:" in line or "Error" in line.split(":")[0]:
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def _train(config: str, overrides: Dict[str, object], log: str, output_dir: str) -> Step:
    argv = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config]
    return Step(argv + _flat({**overrides, "OUTPUT_DIR": output_dir}), log, output_dir)


def batch_cap_overrides(cfg, max_batch: int) -> Dict[str, object]:
    """Global batches of at most ``max_batch`` images per stream (0: the config's): shapes and the per-process
    batch of 2 or more that shows a mixed-size batch are kept; only the number of images per step falls (STAL's
    16 labelled 769x769 crops dominate a check)."""
    if max_batch <= 0:
        return {}
    return {
        key: min(getattr(cfg.SOLVER, key.split(".")[1]), max_batch)
        for key in ("SOLVER.IMS_PER_BATCH_SOURCE", "SOLVER.IMS_PER_BATCH_TARGET")
    }


def plan(config: str, iters: int, planned: Dict[str, Check], max_batch: int = 0) -> Check:
    """The steps that check ``config`` (its prerequisites first, each trained once per invocation)."""
    cfg, _ = load_cfg(config, [])
    overrides = {**shrink_overrides(cfg), **short_run_overrides(iters), **batch_cap_overrides(cfg, max_batch)}
    name = os.path.relpath(config, REPO)
    check = Check(name)
    writer = config_writing(cfg.MODEL.WEIGHTS, config) if cfg.MODEL.WEIGHTS else None
    if writer and os.path.relpath(os.path.abspath(writer), REPO) not in planned:
        # A second stage: its first stage (once per invocation), then this one from the first's final weights.
        check.steps += plan(os.path.abspath(writer), iters, planned, max_batch).steps
    if cfg.MODEL.META_ARCHITECTURE == "DUDA" and not cfg.MODEL.WEIGHTS:
        # DUDA starts from a warm-up of its own network and an initial bank (the config's comment).
        warmup = cfg.OUTPUT_DIR + "_source_only_warmup"
        check.steps.append(_train(config, {**overrides, **DUDA_WARMUP}, f"{name}.warmup.log", warmup))
        bank = cfg.OUTPUT_DIR + "_initial_bank"
        argv = [sys.executable, os.path.join(REPO, "tools", "generate_pseudo_labels.py"), "--config-file", config]
        argv += ["--output", bank] + _flat(shrink_overrides(cfg))
        argv += ["MODEL.WEIGHTS", os.path.join(warmup, "model_final.pth")]
        check.steps.append(Step(argv, f"{name}.initial_bank.log"))
        overrides.update(
            {"MODEL.WEIGHTS": os.path.join(warmup, "model_final.pth"), "UDA.PSEUDO_LABEL_BANK.INITIAL_DIR": bank}
        )
    check.steps.append(_train(config, overrides, f"{name}.log", cfg.OUTPUT_DIR))
    planned[name] = check
    return check


def _seconds_per_iter(workspace: Workspace, output_dir: str) -> Optional[float]:
    path = os.path.join(workspace.root, output_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    times = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "time" in record and "total_loss" in record:
                times.append(float(record["time"]))
    return times[-1] if times else None


def _evaluated(workspace: Workspace, output_dir: str) -> bool:
    path = os.path.join(workspace.root, output_dir, "metrics.json")
    with open(path) as f:
        return any("mIoU" in line for line in f)


def run_check(workspace: Workspace, check: Check) -> Check:
    start = time.monotonic()
    check.result = "pass"
    for step in check.steps:
        if "--config-file" in step.argv:
            cfg, _ = load_cfg(step.argv[step.argv.index("--config-file") + 1], [])
            workspace.ilm_assl_lists(cfg)
        log = step.log.replace(os.sep, "__")
        done = workspace.run(step.argv, log)
        if done.returncode:
            check.result = f"fail: {_last_error(done.stderr)} (log: {os.path.join(workspace.logs, log)})"
            break
        if step.output_dir and not _evaluated(workspace, step.output_dir):
            check.result = "fail: no evaluation result in metrics.json"
            break
    last = check.steps[-1]
    check.seconds_per_iter = _seconds_per_iter(workspace, last.output_dir) if check.result == "pass" else None
    check.seconds = time.monotonic() - start
    return check


def table(checks: List[Check]) -> str:
    rows = [
        [c.config, c.result, f"{c.seconds_per_iter:.2f}" if c.seconds_per_iter is not None else "", f"{c.seconds:.0f}"]
        for c in checks
    ]
    return tabulate(rows, headers=["config", "result", "s/it (shrunk network)", "seconds"], tablefmt="github")


def check_configs(configs: List[str], iters: int, root: str, progress: bool = True, max_batch: int = 0) -> List[Check]:
    """Fabricate and prepare the datasets in ``root``, then check every config (first stages first), with global
    batches capped at ``max_batch`` images per stream when it is > 0."""
    workspace = Workspace(root)
    workspace.prepare()
    planned: Dict[str, Check] = {}
    # First stages before the configs that start from their weights, so that each is trained once.
    configs = sorted(configs, key=lambda c: bool(load_cfg(c, [])[0].MODEL.WEIGHTS))
    checks = [plan(c, iters, planned, max_batch) for c in configs]
    for check in checks:
        run_check(workspace, check)
        if progress:
            print(f"{check.result[:4]}  {check.config}  {check.seconds:.0f} s", flush=True)
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help="config files (default: every paper config)")
    parser.add_argument(
        "--iters", type=int, default=4, help="training iterations per config (the step time is recorded from the 4th)"
    )
    parser.add_argument(
        "--max-batch", type=int, default=0, help="cap every global batch at this many images (0: the config's)"
    )
    parser.add_argument("--workdir", default="", help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--output", default="", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    configs = [os.path.abspath(c) for c in args.configs] or paper_configs()
    missing = [c for c in configs if not os.path.isfile(c)]
    if missing:
        print(f"check_configs.py: error: config '{missing[0]}' does not exist", file=sys.stderr)
        return 1
    root = args.workdir or tempfile.mkdtemp(prefix="uda_config_check_")
    try:
        checks = check_configs(configs, args.iters, root, max_batch=args.max_batch)
        report = table(checks)
        print(report)
        if args.output:
            when = time.strftime("%Y-%m-%d")
            header = f"Config check at real shapes ({when}, `tools/check_configs.py`, {os.cpu_count()} cores)\n\n"
            with open(args.output, "w") as f:
                f.write(header + report + "\n")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if all(c.result == "pass" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
