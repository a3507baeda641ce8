"""MCL's warm-up stage: per-target heads and discriminators, each loss term reaching only the networks it should, the
composite optimizer's Adam state in the checkpoint, and the configuration errors."""

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
TWO_TARGETS = {
    "DATASETS.TARGET_TRAIN": "('synthetic_tiny_target_train', 'synthetic_tiny_target_dusk_train')",
    "DATASETS.TEST": "('synthetic_tiny_target_val', 'synthetic_tiny_target_dusk_val')",
}


def _cfg(tmp_path, **extra):
    cfg = get_uda_cfg()
    cfg.merge_from_file(CONFIG)
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
    with pytest.raises(NotImplementedError, match="UDA.MCL.STAGE"):
        build_model(_cfg(tmp_path, **{"UDA.MCL.STAGE": "self_training"}))


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
