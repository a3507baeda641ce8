"""MCL: the warm-up stage (per-target heads and discriminators, each loss term reaching only the networks it should,
the composite optimizer's Adam state in the checkpoint), the self-training stage (losses equal to the reference's,
gradients per head, the agnostic head's learning rate, soft pseudo-labels from the warm-up's heads, refreshed and
re-read by the loader) and the configuration errors."""

import os
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_overrides

sys.path.insert(0, os.path.join(REPO, "tools"))
import train_net  # noqa: E402

from uda_plugins.config import get_uda_cfg  # noqa: E402
from uda_plugins.d2 import EventStorage, build_model  # noqa: E402
from uda_plugins.data.build import build_uda_train_loader  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "synthetic", "mcl_warmup.yaml")
SELF_TRAINING = os.path.join(REPO, "configs", "synthetic", "mcl.yaml")
TWO_TARGETS = {
    "DATASETS.TARGET_TRAIN": "('synthetic_tiny_target_train', 'synthetic_tiny_target_dusk_train')",
    "DATASETS.TEST": "('synthetic_tiny_target_val', 'synthetic_tiny_target_dusk_val')",
}


def _cfg(tmp_path, config=CONFIG, **extra):
    cfg = get_uda_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(tiny_overrides(str(tmp_path / "out"), **dict(TWO_TARGETS, **extra)))
    return cfg


def test_each_loss_reaches_only_the_networks_it_trains(tmp_path):
    cfg = _cfg(tmp_path)
    model = build_model(cfg).train()
    assert list(model.student.heads) == ["target0", "target1"] and model.student.active_head == "target1"
    assert len(model.discriminators) == 2
    batch = next(iter(build_uda_train_loader(cfg, model.data_requirements)))
    student, discriminators = list(model.student.parameters()), list(model.discriminators.parameters())
    for name, reaches_student, reaches_discriminators in [
        ("loss_source", True, False),
        ("loss_adversarial", True, False),
        ("loss_discriminator", False, True),
    ]:
        model.zero_grad(set_to_none=True)
        with EventStorage(0):
            losses = model(batch)
        losses[name].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student) == reaches_student, name
        assert any(p.grad is not None for p in discriminators) == reaches_discriminators, name
    assert set(losses) == {"loss_source", "loss_adversarial", "loss_discriminator"}


def test_warm_up_trains_the_discriminators_and_checkpoints_their_adam(tmp_path):
    out = str(tmp_path / "mcl")
    extra = dict(TWO_TARGETS, **{"SOLVER.MAX_ITER": 6, "SOLVER.WARMUP_ITERS": 0, "TEST.EVAL_PERIOD": 0})
    assert train_net.cli(["--config-file", CONFIG] + tiny_overrides(out, **extra)) == 0
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    cfg = _cfg(tmp_path)
    initial = build_model(cfg).state_dict()
    for key in ("discriminators.0.classifier.weight", "discriminators.1.features.0.weight"):
        assert not torch.equal(final["model"][key], initial[key]), key  # trained
    optimizers = final["trainer"]["_trainer"]["optimizer"]["optimizers"]
    assert len(optimizers) == 2 and optimizers[1]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert len(optimizers[1]["state"]) == len(list(build_model(cfg).discriminators.parameters()))


def test_configuration_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        build_model(_cfg(tmp_path, **{"DATASETS.TARGET_TRAIN": "('synthetic_tiny_target_train',)"}))
    with pytest.raises(ValueError, match="UDA.MCL.STAGE"):
        build_model(_cfg(tmp_path, **{"UDA.MCL.STAGE": "stage2"}))
    with pytest.raises(ValueError, match="UDA.MCL.EVAL_HEAD 'ensemble'"):
        build_model(_cfg(tmp_path, SELF_TRAINING, **{"UDA.MCL.EVAL_HEAD": "ensemble"}))
    with pytest.raises(ValueError, match="UDA.MCL.EVAL_HEAD 'agnostic'"):
        build_model(_cfg(tmp_path, **{"UDA.MCL.EVAL_HEAD": "agnostic"}))  # the warm-up has none
    with pytest.raises(ValueError, match="ENSEMBLE_ORDER"):
        build_model(_cfg(tmp_path, SELF_TRAINING, **{"UDA.MCL.ENSEMBLE_ORDER": "random"}))


def _reference_mcl_selection(probs):
    # feifei-cv/MCL models/adaptation_modelv2.py step(): entropy-guided pseudo-labels, transcribed with numpy
    C = probs.shape[1]
    entropy = (-probs * np.log2(probs + 1e-30)).sum(1) / np.log2(C)
    labels = probs.argmax(1)
    thres = []
    for c in range(C):
        x = entropy[labels == c]
        if len(x) == 0:
            thres.append(0)
            continue
        x = np.sort(x)
        thres.append(x[np.int32(np.round(len(x) * 0.5))])
    keep = np.zeros(labels.shape, bool)
    for c in range(C):
        keep |= (labels == c) & (entropy < np.maximum(0.25, thres[c]))
    return np.where(keep, labels, 255)


def test_mcl_median_entropy_selection_equals_the_reference():
    from uda_plugins.methods.offline_pseudo_labels import median_entropy_pseudo_labels

    g = torch.Generator().manual_seed(6)
    for scale in (0.5, 3.0):  # mostly uncertain (the median decides) and mostly confident (the floor decides)
        probs = torch.softmax(torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64) * scale, 1)
        probs[0, :, 0, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # class 4 present once
        ours, _ = median_entropy_pseudo_labels(probs)
        assert np.array_equal(ours.numpy(), _reference_mcl_selection(probs.numpy()))


# ------------------------------------------------------------------------------------------------ self-training
def _reference_target_loss(own, agnostic, others, ensemble, labels, num_targets, gamma=1.0, ratio=1.0):
    # feifei-cv/MCL@b91c947 models/adaptation_modelv2.py step(), the body of the loop over targets, transcribed
    # (logits already at the pseudo-label's resolution; ignore label 250; rectify on).
    import torch.nn.functional as F

    maskS = (labels != 250).float()
    loss_CTS_transfered_all, weights_all = 0, 0
    for out in others:
        variance1 = torch.sum(F.kl_div(F.log_softmax(out, dim=1), F.softmax(own.detach(), dim=1), reduction="none"), 1)
        weights_all += torch.exp(-gamma * variance1).detach()
        loss_CTS_transfered_all += F.cross_entropy(out, labels, ignore_index=250, reduction="none")
    weights_all /= num_targets - 1
    loss_ensemble_all = F.cross_entropy(ensemble, labels, ignore_index=250, reduction="none")
    loss_CTS_all = F.cross_entropy(own, labels, ignore_index=250, reduction="none")
    loss_ensemble_all = (loss_ensemble_all * weights_all * maskS).sum() / maskS.sum()
    loss_CTS_transfered_all = ((loss_CTS_transfered_all * weights_all * maskS).sum() / maskS.sum()) / (num_targets - 1)
    loss_CTS_all = (loss_CTS_all * weights_all * maskS).sum() / maskS.sum()
    student = F.log_softmax(agnostic, dim=1)
    teacher = F.softmax(own.detach(), dim=1)
    teacher_copy = F.log_softmax(own, dim=1)
    ensemble_teacher = F.softmax(ensemble.detach(), dim=1)
    loss_kd = F.kl_div(student, teacher, reduction="none") + F.kl_div(teacher_copy, ensemble_teacher, reduction="none")
    mask = (teacher != 250).float()
    loss_kd = (loss_kd * mask).sum() / mask.sum()
    loss_kd /= num_targets
    return loss_kd + loss_CTS_all + (ratio * loss_CTS_transfered_all + 0.05 * loss_ensemble_all)


def test_self_training_losses_equal_the_reference():
    from uda_plugins.methods.mcl import target_self_training_losses

    torch.manual_seed(0)
    T, shape = 3, (2, 7, 10, 12)
    own, agnostic, ensemble = (torch.randn(shape, requires_grad=True) for _ in range(3))
    others = [torch.randn(shape, requires_grad=True) for _ in range(T - 1)]
    labels = torch.randint(0, 7, shape[:1] + shape[2:])
    labels[torch.rand(labels.shape) < 0.3] = 250
    ours = target_self_training_losses(own, agnostic, others, ensemble, labels, 1.0, True, 250)
    total = ours["individual"] + ours["collaborative"] + 0.05 * ours["ensemble"] + ours["distillation"] / T
    reference = _reference_target_loss(own, agnostic, others, ensemble, labels, T)
    assert torch.allclose(total, reference, rtol=1e-5)
    grads = torch.autograd.grad(total, [own, agnostic, ensemble] + others)
    for g, r in zip(grads, torch.autograd.grad(reference, [own, agnostic, ensemble] + others)):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-7)


def _self_training_model(tmp_path, **extra):
    """A self-training MCL model on the tiny two-target pair, its banks filled, and one training batch."""
    cfg = _cfg(tmp_path, SELF_TRAINING, **dict(TWO_TARGETS, **{"MODEL.WEIGHTS": ""}, **extra))
    model = build_model(cfg).train()
    loader = build_uda_train_loader(cfg, model.data_requirements)
    loader.attach_target_label_banks(model.pseudo_label_banks())
    for bank in model.pseudo_label_banks():
        bank.open()
    model.initialize_bank(cfg)
    return cfg, model, next(iter(loader))


def test_self_training_gradients_reach_the_heads_each_term_trains(tmp_path):
    _, model, batch = _self_training_model(tmp_path)
    heads = model.student.heads
    assert list(heads) == ["target0", "target1", "agnostic", "ensemble"] and model.student.active_head == "agnostic"
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {
        "loss_source",
        "loss_source_ensemble",
        "loss_individual",
        "loss_collaborative",
        "loss_ensemble",
        "loss_distillation",
    }
    expected = {  # the heads each term trains (every term trains the backbone)
        "loss_source": {"target0", "target1", "agnostic"},
        "loss_source_ensemble": {"ensemble"},
        "loss_individual": {"target0", "target1"},
        "loss_collaborative": {"target0", "target1"},
        "loss_ensemble": {"ensemble"},
        "loss_distillation": {"target0", "target1", "agnostic"},  # the ensemble teaches, detached
    }
    for name, trained in expected.items():
        model.zero_grad(set_to_none=True)
        losses[name].backward(retain_graph=True)
        reached = {
            h for h, m in heads.items() if any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
        }
        assert reached == trained, name
        assert any(p.grad is not None for p in model.student.backbone.parameters()), name


def test_only_the_agnostic_head_learns_ten_times_faster_in_self_training(tmp_path):
    from uda_plugins.engine.optim import build_optimizer

    for config, fast in ((CONFIG, {"target0", "target1"}), (SELF_TRAINING, {"agnostic"})):
        cfg = _cfg(tmp_path, config, **dict(TWO_TARGETS, **{"SOLVER.HEAD_LR_MULTIPLIER": 10.0}))
        model = build_model(cfg)
        optimizer = build_optimizer(cfg, model)
        lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        for name, head in model.student.heads.items():
            expected = 10 * cfg.SOLVER.BASE_LR if name in fast else cfg.SOLVER.BASE_LR
            assert all(lr[id(p)] == pytest.approx(expected) for p in head.parameters()), name
        assert all(lr[id(p)] == pytest.approx(cfg.SOLVER.BASE_LR) for p in model.student.backbone.parameters())


def test_self_training_starts_from_the_warm_up_and_refreshes_what_the_loader_reads(tmp_path):
    from uda_plugins.d2 import DetectionCheckpointer
    from uda_plugins.data.pseudo_label_bank import read_array_file
    from uda_plugins.engine.metrics_log import read_metrics_log

    warm_up = str(tmp_path / "warm_up")
    extra = dict(TWO_TARGETS, **{"SOLVER.MAX_ITER": 2, "TEST.EVAL_PERIOD": 0, "VIS_PERIOD": 0})
    assert train_net.cli(["--config-file", CONFIG] + tiny_overrides(warm_up, **extra)) == 0
    weights = os.path.join(warm_up, "model_final.pth")

    # Non-strict loading: the target heads and the backbone are the warm-up's, the new heads keep their own
    # initialisation; the discriminators are left behind. The first bank is each target head's prediction.
    cfg = _cfg(tmp_path, SELF_TRAINING, **dict(TWO_TARGETS, **{"MODEL.WEIGHTS": weights}))
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    warm = torch.load(weights, weights_only=True)["model"]
    state = model.state_dict()
    for key, value in warm.items():
        if not key.startswith("discriminators."):
            assert torch.equal(state[key], value), key
    assert not any(k.startswith(("student.heads.agnostic.", "student.heads.ensemble.")) for k in warm)
    for bank in model.pseudo_label_banks():
        bank.open()
    model.initialize_bank(cfg)
    from uda_plugins.data.build import build_full_view_loader

    model.eval()
    images = next(iter(build_full_view_loader(cfg, "synthetic_tiny_target_dusk_train", 1)))
    x = model.student.normalize(torch.stack([images[0]["image"]]).float())
    expected = torch.softmax(model.student.decode_with("target1", model.student.extract_features(x)), 1)[0]
    stored = model.pseudo_label_banks()[1].read(0)[0]
    assert stored.dtype == np.float16 and stored.shape == tuple(expected.shape)  # C x h x w, the head's resolution
    assert torch.allclose(torch.from_numpy(stored).float(), expected, atol=2e-3)

    # Training: a refresh after iteration 0 (before iteration 1, REFRESH_PERIOD 2); the samples 2 loader workers
    # had prefetched from the first bank are re-read in the main process.
    out = str(tmp_path / "self_training")
    run = dict(TWO_TARGETS, **{"MODEL.WEIGHTS": weights, "UDA.MCL.REFRESH_PERIOD": 2, "DATALOADER.NUM_WORKERS": 2})
    run.update({"TEST.EVAL_PERIOD": 0, "SOLVER.MAX_ITER": 4})
    assert train_net.cli(["--config-file", SELF_TRAINING] + tiny_overrides(out, **run)) == 0
    tables = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["trainer"]["hooks"]
    (bank_state,) = [v for k, v in tables.items() if "PseudoLabelBank" in k]
    for k in ("bank0", "bank1"):
        assert (bank_state[k]["versions"] == 1).all()  # written after iteration 0
    root = os.path.join(out, "pseudo_label_bank", "synthetic_tiny_target_train")
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names if not f.startswith(".")]
    assert len(files) == len(model.pseudo_label_banks()[0]) and all(f.endswith("@1.npy") for f in files)
    assert read_array_file(files[0]).shape == stored.shape
    stale = [
        r["bank/stale_reads"] for r in read_metrics_log(os.path.join(out, "metrics.json")) if "bank/stale_reads" in r
    ]
    assert stale[-1] > 0
