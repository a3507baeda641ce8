"""Multi-process training (gloo on the CPU) against one process with gradient accumulation: the same samples, the
same random draws, the same losses; the EMA teacher identical on every rank after every step."""

import json
import os
import sys

import pytest
import torch
from conftest import REPO, tiny_overrides

sys.path.insert(0, os.path.join(REPO, "tools"))
import train_net  # noqa: E402

from uda_plugins.d2 import HookBase, comm, default_argument_parser, launch  # noqa: E402
from uda_plugins.engine.metrics_log import read_metrics_log  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "synthetic")
ITERS = 3


def _overrides(out, **extra):
    values = {
        "SOLVER.MAX_ITER": ITERS,
        "SOLVER.IMS_PER_BATCH_SOURCE": 4,
        "SOLVER.IMS_PER_BATCH_TARGET": 4,
        "SOLVER.CHECKPOINT_PERIOD": 100,
        "TEST.EVAL_PERIOD": 0,
        "VIS_PERIOD": 0,
    }
    values.update(extra)
    return tiny_overrides(out, **values)


def _losses(out):
    records = [r for r in read_metrics_log(os.path.join(out, "metrics.json")) if "total_loss" in r]
    assert [r["iteration"] for r in records] == list(range(ITERS))
    return [{k: v for k, v in r.items() if k.startswith("loss") or k == "total_loss"} for r in records]


# Float32's unit roundoff (round to nearest: half the machine epsilon 2^-23).
UNIT_ROUNDOFF = 2.0**-24

# Plain SGD (momentum, no weight decay, a constant learning rate from the first step): the update is linear in the
# gradients, so the difference of two runs' updates is the difference of their gradient sums (see
# _assert_same_updates). AdamW divides by sqrt(v), which turns summation-order noise in a gradient near zero into a
# full-size step: its weights cannot be compared on another CPU's summation order.
SGD_UPDATES = {
    "SOLVER.OPTIMIZER": "SGD",
    "SOLVER.BASE_LR": 0.05,
    "SOLVER.WEIGHT_DECAY": 0.0,
    "SOLVER.WARMUP_ITERS": 0,
    "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
    "SOLVER.STEPS": "()",
}


def _initial_checkpoint(config, overrides, path):
    """The model of ``config`` as training builds it, saved to ``path``: runs that load it (MODEL.WEIGHTS) start from
    known weights, so their updates can be compared."""
    from uda_plugins.engine import UDATrainer
    from uda_plugins.engine.setup import load_cfg

    cfg, _ = load_cfg(config, overrides)
    torch.save({"model": UDATrainer.build_model(cfg).state_dict()}, path)
    return path


def _assert_same_updates(init, a, b, *, steps, summed_terms, skip=lambda key: False):
    """Two runs that add the same gradient terms in another order (an all-reduce against gradient accumulation, each
    CPU's blocking of its reductions) made the same updates ``a - init`` and ``b - init``, per tensor in norm.

    Why the tolerance holds on any CPU: a float32 sum of n terms, in any order, is within gamma_n * sum|x_i| of the
    exact sum, gamma_n = n u / (1 - n u) with u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms,
    2nd ed., eq. 4.4); two orders differ by at most 2 gamma_n sum|x_i|. Under SGD the update is linear in the gradients,
    so over ``steps`` steps the updates differ by at most steps * 2 gamma_n times the terms' magnitudes, plus the
    rounding of the stored weights (u |w| per element and step, in each run). ``summed_terms`` bounds n: the pixels a
    process's step sums a weight's gradient over (forwards x images x pixels). The terms' magnitudes are taken as the
    tensor's own update, or for a tensor whose terms cancel (a bias before a normalisation: its update is far smaller
    than its terms) as the model's typical update per element (its RMS), whichever is larger. The worst-case bound
    leaves the gap between worst-case (n u) and typical (sqrt(n) u) rounding, a factor sqrt(n) (about 100 here), for
    what these magnitudes miss. Nothing here depends on the CPU; a semantic difference (another sample, mask or loss
    weight, a gradient averaged twice) moves whole tensors by a large fraction of their update. BatchNorm buffers
    count per process and are never compared."""
    gamma = summed_terms * UNIT_ROUNDOFF / (1 - summed_terms * UNIT_ROUNDOFF)
    keys = [
        k
        for k in a
        if "running_" not in k and "num_batches_tracked" not in k and not skip(k) and a[k].is_floating_point()
    ]
    assert keys
    updates = {k: (a[k].double() - init[k].double(), b[k].double() - init[k].double()) for k in keys}
    total = torch.cat([ua.flatten() for ua, _ in updates.values()])
    rms = total.norm() / total.numel() ** 0.5
    for k, (update_a, update_b) in updates.items():
        magnitude = torch.maximum(update_a.norm(), rms * update_a.numel() ** 0.5)
        tolerance = steps * (2 * gamma * magnitude + 2 * UNIT_ROUNDOFF * a[k].double().norm())
        difference = (update_a - update_b).norm()
        assert difference <= tolerance, f"{k}: the updates differ by {difference:.3g} (norm), more than {tolerance:.3g}"


def _assert_same_losses(a, b, rel=1e-4):
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6), (k, ra, rb)


class _TeacherAgreement(HookBase):
    """After every step: gather the teacher's parameters from every rank and compare them bitwise."""

    def __init__(self, path):
        self.path, self.equal = path, []

    def after_step(self):
        teacher = self.trainer.model.module.teacher
        flat = torch.cat([p.detach().flatten() for p in teacher.parameters()])
        gathered = comm.all_gather(flat)
        self.equal.append(all(torch.equal(gathered[0], g) for g in gathered[1:]))

    def after_train(self):
        with open(f"{self.path}.rank{comm.get_rank()}.json", "w") as f:
            json.dump(self.equal, f)


def _train_checking_the_teacher(args, report):
    from uda_plugins.engine import UDATrainer, setup_cfg

    cfg = setup_cfg(args)
    trainer = UDATrainer(cfg)
    trainer.register_hooks([_TeacherAgreement(report)])
    trainer.resume_or_load(resume=False)
    trainer.train()


def test_two_processes_equal_one_with_accumulation_and_share_the_teacher(tmp_path):
    config = os.path.join(CONFIGS, "mic.yaml")
    extra = {"UDA.MIC.BLOCK_SIZE": 16, **SGD_UPDATES}
    init_overrides = _overrides(str(tmp_path / "init"), **extra)
    extra["MODEL.WEIGHTS"] = _initial_checkpoint(config, init_overrides, tmp_path / "i.pth")
    ddp, report = str(tmp_path / "ddp"), str(tmp_path / "teacher")
    args = default_argument_parser().parse_args(["--config-file", config] + _overrides(ddp, **extra))
    launch(_train_checking_the_teacher, 2, dist_url="auto", args=(args, report))
    for rank in range(2):
        with open(f"{report}.rank{rank}.json") as f:
            assert json.load(f) == [True] * ITERS

    accumulated = str(tmp_path / "accumulated")
    overrides = _overrides(accumulated, **extra, **{"SOLVER.GRAD_ACCUMULATION_STEPS": 2})
    assert train_net.cli(["--config-file", config] + overrides) == 0
    # Same samples, same class choices, augmentation and masks, same BatchNorm batches (2 images each).
    _assert_same_losses(_losses(ddp), _losses(accumulated))
    init = torch.load(extra["MODEL.WEIGHTS"], weights_only=True)["model"]
    a = torch.load(os.path.join(ddp, "model_final.pth"), weights_only=True)["model"]
    b = torch.load(os.path.join(accumulated, "model_final.pth"), weights_only=True)["model"]
    # MIC's student sees the source, the mixed and the masked images: 3 forwards of 2 images of 48x96 per process.
    _assert_same_updates(init, a, b, steps=ITERS, summed_terms=3 * 2 * 48 * 96)


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    # Batch-independent normalisation and no dropout: the global batch in one process is the same computation.
    config = os.path.join(CONFIGS, "source_only.yaml")
    extra = {"MODEL.BACKBONE.NORM": "GN", "MODEL.SEM_SEG_HEAD.NORM": "GN", "MODEL.SEM_SEG_HEAD.DROPOUT": 0.0}
    runs = {}
    for name, flags, more in [
        ("ddp", ["--num-gpus", "2", "--dist-url", "auto"], {}),
        ("single", [], {}),
        ("accumulated", [], {"SOLVER.GRAD_ACCUMULATION_STEPS": 4}),
    ]:
        out = str(tmp_path / name)
        assert train_net.cli(["--config-file", config, *flags] + _overrides(out, **extra, **more)) == 0
        runs[name] = _losses(out)
    _assert_same_losses(runs["ddp"], runs["single"])
    _assert_same_losses(runs["accumulated"], runs["single"])


def test_batch_must_divide_over_processes_and_micro_batches(tmp_path, capsys):
    config = os.path.join(CONFIGS, "source_only.yaml")
    overrides = _overrides(str(tmp_path / "bad"), **{"SOLVER.GRAD_ACCUMULATION_STEPS": 3})
    assert train_net.cli(["--config-file", config] + overrides) == 1
    assert "GRAD_ACCUMULATION_STEPS (3)" in capsys.readouterr().err


def _bank_labels(out):
    import cv2

    root = os.path.join(out, "pseudo_label_bank")
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if "@" in f)
    return {f: cv2.imread(os.path.join(root, f), cv2.IMREAD_UNCHANGED) for f in files}


def test_duda_on_two_processes_equals_one_with_accumulation_and_writes_each_label_once(tmp_path):
    # The bank is rewritten at every step (2 of 24 images per process per step, each by the process that holds it);
    # the thresholds are per micro-batch, so 2 processes x 1 micro-batch = 1 process x 2 micro-batches. No warm-up,
    # the student's BatchNorm statistics frozen and one eval-mode teacher forward: running statistics are per process
    # (and, with accumulation, updated micro-batch after micro-batch), so as released they would differ here.
    config = os.path.join(CONFIGS, "duda.yaml")
    extra = {
        "INPUT.TARGET.CROP_SIZE": "(32, 64)",
        "UDA.DUDA.SOURCE_WARMUP_ITERS": 0,
        "UDA.DUDA.UPDATE_START": 0,
        "UDA.DUDA.ALPHA_RAMP_START": 0,
        "UDA.DUDA.BETA_RAMP_START": 0,
        "UDA.DUDA.BATCH_NORM": "frozen_statistics",
        "UDA.DUDA.TEACHER_FORWARDS": "eval",
        **SGD_UPDATES,  # the banks are compared after steps: updates linear in the gradients (see above)
    }
    ddp = str(tmp_path / "ddp")
    assert (
        train_net.cli(["--config-file", config, "--num-gpus", "2", "--dist-url", "auto"] + _overrides(ddp, **extra))
        == 0
    )
    accumulated = str(tmp_path / "accumulated")
    overrides = _overrides(accumulated, **extra, **{"SOLVER.GRAD_ACCUMULATION_STEPS": 2})
    assert train_net.cli(["--config-file", config] + overrides) == 0
    _assert_same_losses(_losses(ddp), _losses(accumulated))
    a, b = _bank_labels(ddp), _bank_labels(accumulated)
    assert a.keys() == b.keys()  # the same images rewritten at the same iterations
    written = [f for f in a if not f.endswith("@0.png")]
    assert len(written) == 4 * ITERS  # 4 images per step, one file each
    for f in a:
        assert (a[f] == b[f]).mean() > 0.99, f


def test_mcl_self_training_on_two_processes_equals_one_with_accumulation(tmp_path):
    # Both soft pseudo-label banks are made by the two processes together (each its shard of the images) and remade
    # after iteration 0; the losses and every file equal one process with two micro-batches. BatchNorm is frozen, so
    # no per-process running statistics enter the refreshed labels (and it must stay frozen across a refresh).
    import numpy as np

    config = os.path.join(CONFIGS, "mcl.yaml")
    extra = {
        "DATASETS.TARGET_TRAIN": "('synthetic_tiny_target_train', 'synthetic_tiny_target_dusk_train')",
        "DATASETS.TEST": "('synthetic_tiny_target_val', 'synthetic_tiny_target_dusk_val')",
        "MODEL.WEIGHTS": "",
        "UDA.MCL.FREEZE_BN": True,
        "UDA.MCL.REFRESH_PERIOD": 2,
        **SGD_UPDATES,  # the refreshed labels come from the weights after two steps (see above)
    }
    ddp = str(tmp_path / "ddp")
    args = ["--config-file", config, "--num-gpus", "2", "--dist-url", "auto"] + _overrides(ddp, **extra)
    assert train_net.cli(args) == 0
    accumulated = str(tmp_path / "accumulated")
    overrides = _overrides(accumulated, **extra, **{"SOLVER.GRAD_ACCUMULATION_STEPS": 2})
    assert train_net.cli(["--config-file", config] + overrides) == 0
    _assert_same_losses(_losses(ddp), _losses(accumulated))

    def soft_labels(out):
        root = os.path.join(out, "pseudo_label_bank")
        files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if "@" in f)
        return {f: np.load(os.path.join(root, f)).astype(np.float32) for f in files}

    a, b = soft_labels(ddp), soft_labels(accumulated)
    assert a.keys() == b.keys() and len(a) == 2 * 24 and all(f.endswith("@1.npy") for f in a)  # refreshed, once
    for f in a:
        assert np.abs(a[f] - b[f]).max() < 2e-3, f
    tracked = [v for k, v in torch.load(os.path.join(ddp, "model_final.pth"))["model"].items() if "num_batches" in k]
    assert tracked and all(int(v) == 0 for v in tracked)  # BatchNorm never left eval mode


class _BufferAgreement(HookBase):
    """After every step: gather the meta-architecture's buffers whose names start with one of ``prefixes`` from every
    rank and compare them."""

    def __init__(self, path, prefixes):
        self.path, self.prefixes, self.equal = path, tuple(prefixes), []

    def after_step(self):
        buffers = [b for n, b in self.trainer.model.module.named_buffers() if n.startswith(self.prefixes)]
        assert len(buffers) >= len(self.prefixes)
        flat = torch.cat([b.detach().double().flatten() for b in buffers])
        gathered = comm.all_gather(flat)
        self.equal.append(all(torch.equal(gathered[0], g) for g in gathered[1:]))

    def after_train(self):
        with open(f"{self.path}.rank{comm.get_rank()}.json", "w") as f:
            json.dump(self.equal, f)


def _train_checking_buffers(args, report, prefixes):
    from uda_plugins.engine import UDATrainer, setup_cfg

    cfg = setup_cfg(args)
    trainer = UDATrainer(cfg)
    trainer.register_hooks([_BufferAgreement(report, prefixes)])
    trainer.resume_or_load(resume=False)
    trainer.train()


def test_stal_on_four_processes_with_one_image_each_shares_its_state(tmp_path):
    # The release's 4 GPUs with one unlabelled image each (A7): SyncBN over the processes in the backbone and the
    # head, whose ASPP image pooling would otherwise see one value per channel and refuse. The class criterion is
    # all-reduced, the CutMix bank and the contrastive queues take every process's updates: each process holds (and
    # would checkpoint) the same state after every step.
    config = os.path.join(CONFIGS, "stal.yaml")
    extra = {
        "MODEL.BACKBONE.NORM": "SyncBN",
        "MODEL.SEM_SEG_HEAD.NORM": "SyncBN",
        "DATASETS.TARGET_LABELED_LIST": "random:3",
        "UDA.STAL.OHEM_MIN_KEPT": 200,
        "UDA.STAL.CONTRASTIVE_START_ITER": 1,  # iteration 0 leaves the representation branch without gradients
        "UDA.STAL.ANCHOR_THRESHOLD": 0.0,
        "UDA.STAL.NUM_QUERIES": 16,
    }
    out, report = str(tmp_path / "ddp"), str(tmp_path / "buffers")
    args = default_argument_parser().parse_args(["--config-file", config] + _overrides(out, **extra))
    prefixes = ["class_criterion", "cutmix_bank", "queues."]  # the queues: their lengths and one key buffer per class
    launch(_train_checking_buffers, 4, dist_url="auto", args=(args, report, prefixes))  # 4 + 4 images: 1 + 1 each
    for rank in range(4):
        with open(f"{report}.rank{rank}.json") as f:
            assert json.load(f) == [True] * ITERS
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]
    assert int(state["queues.length"].sum()) > 0 and int(state["cutmix_bank"].sum()) > 0
