"""Every meta-architecture end to end on the tiny synthetic pair: a few iterations; a run SIGKILLed mid-way and
continued with ``--resume`` ends with weights bitwise equal to an uninterrupted run's (teacher and EMA counter
included; with data-loader workers too); ``--eval-only`` of the student and the teacher; the TensorBoard pictures
of each method. Every method issue adds its method to ``METHODS``."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_overrides

sys.path.insert(0, os.path.join(REPO, "tools"))
import train_net  # noqa: E402

from uda_plugins.engine.metrics_log import read_metrics_log  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "synthetic")
KILLER = os.path.join(REPO, "tests", "kill_after_iteration.py")

# name -> (config file, extra overrides)
METHODS = {
    "source_only_fd": ("source_only.yaml", {"UDA.FD.LAMBDA": 0.005}),
    "dacs": ("dacs.yaml", {}),
    "dacs_mic_fd_margins": (
        "dacs.yaml",
        {
            "UDA.MIC.LAMBDA": 1.0,
            "UDA.MIC.BLOCK_SIZE": 16,
            "UDA.FD.LAMBDA": 0.005,
            "UDA.PSEUDO_LABEL.FRAME_MARGINS": "(2, 6, 2, 2)",
            "UDA.PSEUDO_LABEL.THRESHOLD": 0.0,  # every pixel confident: the margins are what zeroes weights
        },
    ),
    "mic_hrda_rcs": (
        "mic_hrda.yaml",
        {"MODEL.HRDA.HR_CROP_SIZE": "(24, 48)", "DATALOADER.RCS.MIN_PIXELS": 40},  # RCS on, as in HRDA
    ),
    "mic_hrda_gt": (
        "mic_gt.yaml",
        {
            "MODEL.HRDA.ENABLED": True,
            "MODEL.HRDA.HR_CROP_SIZE": "(24, 48)",
            "MODEL.HRDA.ATTENTION_EMBED_DIM": 16,
            "UDA.MIC.BLOCK_SIZE": 16,
            "UDA.GUIDANCE.EMBED_DIM": 32,
        },
    ),
    # The offline pseudo-label bank: filled after a 2-iteration warm-up, rewritten from iteration 3 on (the kill
    # after iteration 5 resumes it mid-update); the killed and resumed runs read it through 2 worker processes.
    "duda": (
        "duda.yaml",
        {
            "INPUT.TARGET.CROP_SIZE": "(32, 64)",
            "UDA.DUDA.SOURCE_WARMUP_ITERS": 2,
            "UDA.DUDA.UPDATE_START": 1,
            "UDA.DUDA.ALPHA_RAMP_START": 1,
            "UDA.DUDA.BETA_RAMP_START": 0,
            "DATALOADER.NUM_WORKERS": 2,
        },
    ),
    # MCL's warm-up on two targets: per-target heads and discriminators, SGD/AdamW + Adam as one composite optimizer.
    "mcl_warmup": (
        "mcl_warmup.yaml",
        {
            "DATASETS.TARGET_TRAIN": "('synthetic_tiny_target_train', 'synthetic_tiny_target_dusk_train')",
            "DATASETS.TEST": "('synthetic_tiny_target_val', 'synthetic_tiny_target_dusk_val')",
        },
    ),
    # MCL's self-training (from random weights here): soft pseudo-label banks remade before iterations 2 and 5, so
    # every kill resumes across a refresh; the killed and resumed runs read the banks through 2 worker processes.
    "mcl": (
        "mcl.yaml",
        {
            "DATASETS.TARGET_TRAIN": "('synthetic_tiny_target_train', 'synthetic_tiny_target_dusk_train')",
            "DATASETS.TEST": "('synthetic_tiny_target_val', 'synthetic_tiny_target_dusk_val')",
            "MODEL.WEIGHTS": "",
            "UDA.MCL.REFRESH_PERIOD": 3,
            "DATALOADER.NUM_WORKERS": 2,
        },
    ),
    # STAL's learner on the source and 3 labelled target images: its class criterion, CutMix bank and contrastive
    # queues are model buffers, so the resumed run must restore them to end bitwise equal.
    "stal": (
        "stal.yaml",
        {
            "DATASETS.TARGET_LABELED_LIST": "random:3",
            "UDA.STAL.OHEM_MIN_KEPT": 200,
            "UDA.STAL.CONTRASTIVE_START_ITER": 2,  # its queues (buffers) fill from iteration 2 and must be restored
            "UDA.STAL.NUM_QUERIES": 16,
        },
    ),
    # Active-learning rounds (entropy) after iterations 1 and 3, the loader rebuilt with 2
    # workers each time: every kill resumes before or after a round, which must be neither repeated nor lost.
    "stal_rounds": (
        "stal.yaml",
        {
            "DATASETS.TARGET_LABELED_LIST": "random:3",
            "UDA.STAL.OHEM_MIN_KEPT": 200,
            "UDA.ACTIVE.ROUND_ITERS": "(2, 4)",
            "UDA.ACTIVE.ROUND_IMAGES": "(2, 3)",
            "DATALOADER.NUM_WORKERS": 2,
        },
    ),
    # bf16 autocast; the killed and resumed runs read their data through 2 worker processes, the uninterrupted
    # one in-process.
    "mic_bf16_2_workers": (
        "mic.yaml",
        {"UDA.MIC.BLOCK_SIZE": 16, "SOLVER.AMP.ENABLED": True, "DATALOADER.NUM_WORKERS": 2},
    ),
}


def _run(config, out, extra, *flags):
    args = ["--config-file", os.path.join(CONFIGS, config), *flags] + tiny_overrides(out, **extra)
    assert train_net.cli(args) == 0


def _bank_contents(out):
    contents = {}
    for kept in ("pseudo_label_bank", "active_learning"):
        root = os.path.join(out, kept)
        for folder, _, files in os.walk(root):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    contents[os.path.relpath(os.path.join(folder, name), out)] = f.read()
    return contents


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_resumes_exactly_and_evaluates(name, tmp_path):
    config, extra = METHODS[name]
    extra = dict(extra, **{"TEST.EVAL_PERIOD": 0, "VIS_PERIOD": 1, "TEST.EVAL_MODEL": "both"})
    extra.update({"SOLVER.MAX_ITER": 7, "SOLVER.CHECKPOINT_PERIOD": 3})  # checkpoints after iterations 2 and 5
    if name in ("source_only_fd", "mcl_warmup", "mcl"):  # no teacher
        extra["TEST.EVAL_MODEL"] = "student"
    full = str(tmp_path / "full")
    _run(config, full, {k: v for k, v in extra.items() if k != "DATALOADER.NUM_WORKERS"})

    # SIGKILLed right after iteration 3, 4 or 5 (before or after its checkpoint), then resumed: the same final
    # weights, bit for bit.
    kill_after = 3 + sorted(METHODS).index(name) % 3
    resumed = str(tmp_path / "resumed")
    args = ["--config-file", os.path.join(CONFIGS, config)] + tiny_overrides(resumed, **extra)
    killed = subprocess.run([sys.executable, KILLER, str(kill_after), *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not os.path.exists(os.path.join(resumed, "model_final.pth"))
    _run(config, resumed, extra, "--resume")
    with open(os.path.join(resumed, "log.txt")) as f:
        start = 6 if kill_after == 5 else 3
        assert f"Starting training from iteration {start}" in f.read()  # not a silent fresh start
    # metrics.json reads like the uninterrupted run's: every iteration once, in order.
    logged = [r["iteration"] for r in read_metrics_log(os.path.join(resumed, "metrics.json")) if "total_loss" in r]
    assert logged == list(range(7))
    a, b = _state(os.path.join(full, "model_final.pth")), _state(os.path.join(resumed, "model_final.pth"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Files a method keeps beside the checkpoint (pseudo-label banks, active-learning lists): the same names and
    # contents.
    assert _bank_contents(full) == _bank_contents(resumed)
    if "teacher" in extra.get("TEST.EVAL_MODEL", ""):
        assert int(a["ema_updates"]) == 7 - int(extra.get("UDA.DUDA.SOURCE_WARMUP_ITERS", 0))
        assert any(
            not torch.equal(a[k], a[k.replace("teacher.", "student.", 1)]) for k in a if k.startswith("teacher.")
        )

    # --eval-only on the trained weights evaluates what TEST.EVAL_MODEL names.
    evaluated = str(tmp_path / "eval")
    _run(config, evaluated, dict(extra, **{"MODEL.WEIGHTS": os.path.join(full, "model_final.pth")}), "--eval-only")
    assert os.path.isfile(os.path.join(evaluated, "inference", "synthetic_tiny_target_val", "sem_seg_evaluation.json"))


def test_dacs_logs_its_losses_and_pictures(tmp_path):
    from test_train_net import _event_tags

    out = str(tmp_path / "dacs")
    extra = {"UDA.MIC.LAMBDA": 1.0, "UDA.MIC.BLOCK_SIZE": 16, "TEST.EVAL_PERIOD": 0, "VIS_PERIOD": 2}
    extra.update({"UDA.GUIDANCE.LAMBDA": 1.0, "UDA.GUIDANCE.EMBED_DIM": 32})
    _run("dacs.yaml", out, extra)
    acc = _event_tags(out)
    assert {"loss_source", "loss_mix", "loss_guidance", "loss_mic", "total_loss"} <= set(acc.Tags()["scalars"])
    images = set(acc.Tags()["images"])
    assert {
        "source/input_gt_pred",
        "target/input_pseudolabel_confidence_weight",
        "mix/input_mask_label_weight_pred",
        "mic/masked_pred",
        "guidance/target_keptmask_pseudolabel_pred",
    } <= images
    mix = acc.Images("mix/input_mask_label_weight_pred")[0]
    assert mix.width == 5 * 96 and mix.height == 48


def test_teacher_is_initialised_from_loaded_weights_but_kept_on_resume(tiny_cfg):
    from uda_plugins.d2 import build_model

    tiny_cfg.MODEL.META_ARCHITECTURE = "DACS"
    model = build_model(tiny_cfg)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)  # as if MODEL.WEIGHTS had loaded a student
    model.init_teacher()
    assert all(torch.equal(t, s) for t, s in zip(model.teacher.parameters(), model.student.parameters()))
    model.update_teacher()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    teacher = [p.clone() for p in model.teacher.parameters()]
    model.init_teacher()  # a resumed run (ema_updates > 0): the teacher is kept
    assert all(torch.equal(t, p) for t, p in zip(teacher, model.teacher.parameters()))
    assert int(model.ema_updates) == 1
    model.train()
    assert not any(m.training for m in model.teacher.modules() if isinstance(m, torch.nn.Dropout2d))
    assert model.student.head.dropout.training
