"""STAL's learner: one step trains the student's heads and the auxiliary head, moves the class criterion, fills the
CutMix bank from the teacher's predictions; the labelled seed set drawn with "random:<n>"."""

import os

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_overrides

from uda_plugins.config import get_uda_cfg
from uda_plugins.d2 import EventStorage, build_model
from uda_plugins.data.build import build_uda_train_loader, get_dataset_dicts

CONFIG = os.path.join(REPO, "configs", "synthetic", "stal.yaml")


def _cfg(tmp_path, **extra):
    cfg = get_uda_cfg()
    cfg.merge_from_file(CONFIG)
    values = {"DATASETS.TARGET_LABELED_LIST": "random:4", "UDA.STAL.OHEM_MIN_KEPT": 200}
    # Contrast from the first step; an untrained teacher gives no class a probability above 0.3: no anchor threshold.
    values.update({"UDA.STAL.CONTRASTIVE_START_ITER": 0, "UDA.STAL.NUM_QUERIES": 16, "UDA.STAL.ANCHOR_THRESHOLD": 0.0})
    cfg.merge_from_list(tiny_overrides(str(tmp_path / "out"), **dict(values, **extra)))
    return cfg


def test_one_step_trains_every_head_and_updates_the_adaptive_state(tmp_path):
    cfg = _cfg(tmp_path)
    model = build_model(cfg).train()
    batch = next(iter(build_uda_train_loader(cfg, model.data_requirements)))
    criterion_before = model.class_criterion.clone()
    assert int(model.cutmix_bank.sum()) == 0  # the release starts with an empty bank
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {"loss_supervised", "loss_consistency", "loss_contrastive"}
    assert sum(len(model.queues.get(c)) for c in range(19)) > 0  # negatives queued (the paper's rule)
    losses["loss_contrastive"].backward(retain_graph=True)
    representation = model.student.head.representation
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in representation.parameters())
    assert all(p.grad is None for p in model.student.head.classifier.parameters())  # only the representation
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    for name, module in (("head", model.student.head), ("aux", model.aux_head), ("backbone", model.student.backbone)):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert all(p.grad is None for p in model.teacher.parameters())
    moved = model.class_criterion - criterion_before * cfg.UDA.STAL.CLASS_MOMENTUM
    assert torch.all(moved >= -1e-7) and torch.any(moved > 0)  # 0.999 cc + 0.001 x confidence in [0, 1]
    own = [d["dataset_index"] for d in batch["target"][0]]
    assert all(model.cutmix_bank[:, i].any() for i in own)  # every predicted image shows some class
    state = model.state_dict()
    assert {"class_criterion", "cutmix_bank", "queues.keys_0", "queues.length"} <= set(state)  # checkpointed


def test_random_seed_set_is_seeded_and_spread_over_cities(tmp_path):
    from uda_plugins.active_learning.selection import group_of
    from uda_plugins.data.build import image_subset

    dicts = get_dataset_dicts(["synthetic_tiny_target_train"])
    first = image_subset("random:8", dicts, seed=3)
    assert first == image_subset("random:8", dicts, seed=3) != image_subset("random:8", dicts, 4)
    groups = [group_of(d["file_name"]) for d in dicts]
    per_city = {g: sum(groups[i] == g for i in first) for g in set(groups)}
    expected = {g: 8 * groups.count(g) / len(groups) for g in set(groups)}
    assert all(abs(per_city[g] - expected[g]) < 1 for g in per_city)
    assert len(set(first)) == 8 and np.all(np.diff(first) > 0)


def test_loss_divisor_reproduces_the_releases_division_by_its_gpus(tmp_path):
    import copy

    cfg = _cfg(tmp_path)
    model = build_model(cfg).train()
    batch = next(iter(build_uda_train_loader(cfg, model.data_requirements)))
    results = []
    for power in (None, 1, 2):  # the library's default (power 1) and the release's (train.py:770-771: / W / W)
        m = copy.deepcopy(model)
        if power is not None:
            m.loss_divisor, m.contrastive_divisor = 4.0, 4.0**power
        torch.manual_seed(3)
        with EventStorage(0):
            results.append({k: float(v.detach()) for k, v in m(batch).items()})
    plain, quarter, released = results
    for k in ("loss_supervised", "loss_consistency"):
        assert quarter[k] == pytest.approx(plain[k] / 4, rel=1e-5) == released[k], k
    assert quarter["loss_contrastive"] == pytest.approx(plain["loss_contrastive"] / 4, rel=1e-5)
    assert released["loss_contrastive"] == pytest.approx(plain["loss_contrastive"] / 16, rel=1e-5)
    assert plain["loss_contrastive"] > 0
    built = build_model(_cfg(tmp_path, **{"UDA.STAL.LOSS_DIVISOR": 4.0, "UDA.STAL.CONTRASTIVE_DIVISOR_POWER": 2}))
    assert (built.loss_divisor, built.contrastive_divisor) == (4.0, 16.0)


@pytest.mark.parametrize("contrast_start", [0, 100])
def test_teacher_forwards_follow_the_release_order_and_modes(tmp_path, contrast_start):
    # ILM-ASSL's train.py: teacher (train mode) on the labelled batch, teacher (eval) on the unlabelled images and
    # their CutMix partners, teacher (train mode) on the mixed unlabelled batch — on every iteration, so its BatchNorm
    # running statistics see the target images before the contrastive term starts too.
    cfg = _cfg(tmp_path, **{"UDA.STAL.CONTRASTIVE_START_ITER": contrast_start})
    model = build_model(cfg).train()
    batch = next(iter(build_uda_train_loader(cfg, model.data_requirements)))
    calls = []
    model.teacher.backbone.register_forward_hook(lambda m, i, o: calls.append((m.training, len(i[0]))))
    with EventStorage(0):
        model(batch)
    n_source, n_target = len(batch["source"]), len(batch["target"][0])
    assert calls == [(True, n_source), (False, n_target), (False, n_target), (True, n_target)]
