#!/usr/bin/env python
"""Training (or inference) speed and memory of a config, measured on its real data pipeline.

    python tools/benchmark.py --config-file configs/synthetic/source_only.yaml [--iters 100] [KEY VALUE ...]
    python tools/benchmark.py --config-file configs/gta5_cityscapes/daformer_mitb5.yaml --synthetic-data \
        SOLVER.AMP.ENABLED True                      # the paper's setting without its datasets or weights
    python tools/benchmark.py --config-file configs/gta5_cityscapes/mic_hrda_mitb5.yaml --synthetic-data \
        --inference 20                               # test-time images per second at 1024x2048

``--synthetic-data`` feeds the config the embedded synthetic pair (one synthetic domain per source / target
dataset) through the config's own input pipeline — its resize, crops and batch sizes — and starts from random
weights (no ImageNet file, no ``MODEL.WEIGHTS``), so a machine without the datasets measures the real shapes.

Prints three tables. The first: seconds per iteration (median and mean over the timed iterations), the first
iteration's seconds (it pays for ``MODEL.COMPILE``'s compilation, cuDNN's autotuning, the allocator's growth), the
part spent waiting for data, images per second (all domains), peak host memory (RSS) and peak device memory, and the
model FLOPs of one step (forward and backward of every network, counted by ``torch.utils.flop_counter`` over one
extra step; fvcore's counter traces a single forward and cannot follow a training step) with the achieved TFLOP/s
and, on a device whose peak is known (or ``--peak-tflops``), the fraction of its peak, and the loader's headroom:
the step time over the time the train loader alone takes per batch (its workers must keep ahead: at least 2x). The
second: the mean time per iteration of each named section of the step (``uda_plugins.utils.profiling.timed``: data
wait, teacher forward, student forwards with their losses, backward, optimizer, mixing/masking/augmentation, EMA)
and the "adaptation machinery" share = everything that is not a network forward/backward or the optimizer. The
third: host memory (RSS) at evenly spaced timed iterations and its change — it must stay flat (dataset dicts are
serialised once; nothing may accumulate per iteration). Sections synchronise the device, which slows a GPU run
slightly. The training hooks run as in training (EMA updates included); nothing is written except a throw-away
OUTPUT_DIR in a temporary folder; no evaluation runs.
"""

import argparse
import math
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

import uda_plugins  # noqa: F401  (registration)
from uda_plugins.d2 import EventStorage
from uda_plugins.data.datasets.synthetic import EXTRA_TARGETS
from uda_plugins.engine import UDATrainer
from uda_plugins.engine.setup import load_cfg, set_determinism
from uda_plugins.modeling import predicted_classes
from uda_plugins.utils.profiling import collect_timings

# Sections that are network compute (MCL's discriminators are networks too: their forwards and losses); the rest of
# the step is adaptation machinery or bookkeeping.
NETWORK_SECTIONS = ("student_forward", "teacher_forward", "discriminators", "backward", "optimizer")

# Dense tensor-core peaks in TFLOP/s (NVIDIA data sheets, SXM parts): (bf16/fp16, tf32). fp32 runs count against
# tf32: cuDNN convolutions use TF32 by default.
DEVICE_PEAK_TFLOPS = {"H200": (989.4, 494.7), "H100": (989.4, 494.7), "A100": (312.0, 156.0)}


def synthetic_data_overrides(cfg, prefix: str = "synthetic") -> list:
    """``KEY VALUE`` overrides that train ``cfg`` on the embedded synthetic pair ``prefix`` (its source, then one
    synthetic target per target of the config) at the config's own input sizes, from random weights. Raises
    ValueError for a config the 19-class synthetic labels cannot feed."""
    targets = len(cfg.DATASETS.TARGET_TRAIN)
    synthetic_targets = [f"{prefix}_target_train"] + [f"{prefix}_target_{style}_train" for style in EXTRA_TARGETS]
    if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != 19:
        raise ValueError(
            f"--synthetic-data feeds 19-class labels; this config has MODEL.SEM_SEG_HEAD.NUM_CLASSES "
            f"{cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}"
        )
    if targets > len(synthetic_targets):
        raise ValueError(f"--synthetic-data has {len(synthetic_targets)} synthetic targets; the config has {targets}")
    labelled = cfg.DATASETS.TARGET_LABELED_LIST
    if labelled and not labelled.startswith("random:"):
        labelled = "random:30"  # ILM-ASSL's 1% of Cityscapes
    return [
        "DATASETS.SOURCE_TRAIN", f"('{prefix}_source_train',)",
        "DATASETS.TARGET_TRAIN", str(tuple(synthetic_targets[:targets])),
        "DATASETS.TEST", f"('{prefix}_target_val',)",
        "DATASETS.TARGET_LABELED_LIST", labelled,
        "DATASETS.SOURCE_LIST", "",
        "DATALOADER.RCS.STATS_DIR", "",
        "DATALOADER.RCS.MIN_PIXELS", "30",  # the reference's share of a GTA5 frame on a synthetic one (dacs_rcs.yaml)
        "UDA.PSEUDO_LABEL_BANK.INITIAL_DIR", "",
        "MODEL.BACKBONE.PRETRAINED", "",
        "MODEL.WEIGHTS", "",
    ]  # fmt: skip


def peak_tflops(cfg, given: float) -> float:
    """The device's peak for the run's precision: ``given``, or the table's entry for this GPU, else 0 (unknown)."""
    if given > 0 or not cfg.MODEL.DEVICE.startswith("cuda"):
        return given
    name = torch.cuda.get_device_name()
    for key, (half, tf32) in DEVICE_PEAK_TFLOPS.items():
        if key in name:
            return half if cfg.SOLVER.AMP.ENABLED else tf32
    return 0.0


def build_cfg(args, output_dir):
    cfg, notes = load_cfg(args.config_file, args.opts)
    for _, message in notes:
        print(message, file=sys.stderr)
    if args.synthetic_data:
        cfg.merge_from_list(synthetic_data_overrides(cfg, args.synthetic_data))
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


def _conv_backward_flops(grad_out, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
                         output_mask, out_shape=None, **kwargs) -> int:  # fmt: skip
    """The input and the weight gradient of a convolution each cost its forward. (torch's own formula ignores
    ``groups`` for the weight gradient: it counts a depthwise convolution's C_in times over.)"""
    spatial = (x if transposed else grad_out)[2:]
    forward = 2 * grad_out[0] * math.prod(weight) * math.prod(spatial)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter (matrix products and convolutions, forward and backward) with grouped convolutions'
    backward counted right."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})


def loader_seconds_per_batch(trainer, cfg, batches: int) -> float:
    """The train loader alone: median seconds per batch over ``batches`` batches, after the batches its workers had
    prefetched during training are taken (they would come for free)."""
    loader = trainer._trainer._data_loader_iter
    for _ in range(cfg.DATALOADER.NUM_WORKERS * 2):  # prefetch_factor 2 per worker (uda_plugins/data/build.py)
        next(loader)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_flops(trainer) -> int:
    """FLOPs of one training step (every network's forward and backward), counted on one extra step."""
    counter = flop_counter()
    with counter:
        trainer.before_step()
        trainer.run_step()
        trainer.after_step()
    return counter.get_total_flops()


def flops_columns(flops: int, seconds: float, peak: float) -> list:
    achieved = flops / seconds / 1e12
    return [f"{flops / 1e9:.4g}", f"{achieved:.3g}", f"{100 * achieved / peak:.1f}%" if peak > 0 else "-"]


def inference_benchmark(cfg, images: int, size, peak: float) -> None:
    """Test-time speed: the model's evaluation forward (TEST.MODE whole or slide, windows batched) on random
    ``size`` images, each to a class map on the host as the evaluator does; 2 warm-up images first."""
    model = UDATrainer.build_model(cfg)
    model.eval()
    cuda = cfg.MODEL.DEVICE.startswith("cuda")
    h, w = size
    inputs = [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8), "height": h, "width": w}]

    def one_image():
        with torch.no_grad():
            predicted_classes(model(inputs)[0]["sem_seg"], dim=0).cpu()

    for _ in range(2):
        one_image()
    counter = flop_counter()
    with counter:
        one_image()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(images):
        start = time.perf_counter()
        one_image()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    mode = cfg.TEST.MODE + (
        f" {tuple(cfg.TEST.SLIDE_CROP_SIZE)} x{cfg.TEST.SLIDE_BATCH_SIZE}" if cfg.TEST.MODE == "slide" else ""
    )
    row = [cfg.MODEL.DEVICE, f"{h}x{w}", mode, f"{sec:.4f}", f"{1 / sec:.2f}"]
    row += [f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if cuda else "-"]
    row += flops_columns(counter.get_total_flops(), sec, peak)
    headers = ["device", "image", "TEST.MODE", "s/image", "images/s", "peak device MiB", "GFLOP/image", "TFLOP/s"]
    print(tabulate([row], headers=headers + ["of peak"], tablefmt="github"))
    print(f"({images} timed images after 2 warm-up; TEST.EVAL_MODEL {cfg.TEST.EVAL_MODEL})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=50, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    parser.add_argument(
        "--synthetic-data",
        nargs="?",
        const="synthetic",
        default="",
        metavar="PREFIX",
        help="the embedded synthetic pair (or another one registered as PREFIX_...) at the config's input sizes",
    )
    parser.add_argument("--inference", type=int, default=0, metavar="N", help="time N test images instead")
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"), help="of --inference")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak (known GPUs: automatic)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config_file):
        parser.error(f"Config file '{args.config_file}' does not exist")

    with tempfile.TemporaryDirectory(prefix="uda_benchmark_") as output_dir:
        cfg = build_cfg(args, output_dir)
        torch.manual_seed(0)
        peak = peak_tflops(cfg, args.peak_tflops)
        if args.inference > 0:
            inference_benchmark(cfg, args.inference, args.size, peak)
            return 0
        trainer = UDATrainer(cfg)
        cuda = cfg.MODEL.DEVICE.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step_times, data_times, first_step = [], [], 0.0
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
                if it == 0:
                    first_step = elapsed
                if it >= args.warmup:
                    step_times.append(elapsed)
                    data_times.append(storage.history("data_time").latest())
                    timings["data_wait"] = data_times[-1]
                    for k, v in timings.items():
                        sections[k] = sections.get(k, 0.0) + v
                if it in rss_at:
                    rss_samples.append((it, current_rss_mib()))
            trainer.iter = storage.iter = total
            flops = step_flops(trainer)
            loader_sec = loader_seconds_per_batch(trainer, cfg, args.iters)
        sec = statistics.median(step_times)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows = [
            [
                os.path.basename(args.config_file),
                cfg.MODEL.DEVICE,
                f"{sec:.4f}",
                f"{statistics.mean(step_times):.4f}",
                f"{first_step:.2f}",
                f"{statistics.median(data_times):.4f}",
                f"{images_per_iteration(cfg, trainer) / sec:.1f}",
                f"{rss_mb:.0f}",
                f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if cuda else "-",
            ]
            + flops_columns(flops, sec, peak)
            + [f"{sec / loader_sec:.1f}x"]
        ]
        print(
            tabulate(
                rows,
                headers=[
                    "config",
                    "device",
                    "s/it (median)",
                    "s/it (mean)",
                    "first it s",
                    "data s/it",
                    "img/s",
                    "peak RSS MiB",
                    "peak device MiB",
                    "GFLOP/it",
                    "TFLOP/s",
                    "of peak",
                    "loader headroom",
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
