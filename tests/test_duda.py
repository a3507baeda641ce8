"""DUDA: the keep/erase/refill rule, the class thresholds, the alpha/beta schedules, symmetric CE and the IAST
regularisers against the reference formulas, the uniform mean teacher, IAST's initial selection, and training runs
(the bank filled after the warm-up and rewritten, per batch or periodically, from an initial folder)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_overrides

sys.path.insert(0, os.path.join(REPO, "tools"))
import train_net  # noqa: E402

from uda_plugins.methods.offline_pseudo_labels import (  # noqa: E402
    InstanceAdaptiveSelector,
    class_percentile_thresholds,
    keep_top_fraction,
    percentile,
    ramp,
    temporal_consistency_update,
)
from uda_plugins.modeling.losses import (  # noqa: E402
    entropy_regularizer,
    kld_uniform_regularizer,
    symmetric_cross_entropy,
)

CONFIG = os.path.join(REPO, "configs", "synthetic", "duda.yaml")
IGN = 255  # the ignore label


def test_keep_erase_refill_rule_on_hand_made_maps():
    old = torch.tensor([[1, 1, IGN, IGN], [2, 2, IGN, 3]])
    prediction = torch.tensor([[1, 0, 4, 4], [2, 5, 6, 3]])
    candidate = torch.tensor([[1, 0, 4, IGN], [2, 5, IGN, IGN]])  # the prediction where confident
    new = temporal_consistency_update(old, prediction, candidate)
    # agree -> kept; disagree -> erased; unlabelled -> the confident candidate (or still ignored)
    assert new.tolist() == [[1, IGN, 4, IGN], [2, IGN, IGN, 3]]
    # The kept label stays even where the new prediction is not confident (pixel (1, 3)).


def test_class_thresholds_equal_numpy_percentiles():
    g = torch.Generator().manual_seed(0)
    confidence = torch.rand(2, 17, 23, generator=g)
    labels = torch.randint(0, 6, (2, 17, 23), generator=g)
    labels[labels == 4] = 3  # class 4 absent
    for fraction in (0.2, 0.45, 0.7, 1.0):
        ours = class_percentile_thresholds(confidence, labels, fraction, 7)
        for c in range(7):
            x = confidence[labels == c].numpy()
            expected = np.percentile(x, (1 - fraction) * 100) if x.size else 0.0
            assert float(ours[c]) == pytest.approx(expected, abs=1e-6), (fraction, c)


def test_device_percentile_is_bitwise_numpy_percentile():
    g = torch.Generator().manual_seed(0)
    for values in (torch.rand(3, 37, 41, generator=g), torch.randint(0, 5, (1, 9, 11), generator=g).float()):
        for q in (0, 0.5, 20, 33.3, 50, 80, 99.9, 100):
            expected = np.percentile(values.double().numpy(), q)
            assert float(percentile(values, q)) == expected, q  # exact, ties included
    assert float(percentile(torch.tensor([7.0]), 30)) == 7.0
    with pytest.raises(ValueError):
        percentile(torch.zeros(0), 50)


def test_keep_top_fraction_keeps_about_that_fraction_of_each_class():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(2, 5, 40, 40, generator=g) * 3, dim=1)
    selected, labels, _ = keep_top_fraction(probs, 0.3)
    for c in range(5):
        kept = ((selected == c).sum() / (labels == c).sum()).item()
        assert kept == pytest.approx(0.3, abs=0.01)
    capped, _, _ = keep_top_fraction(probs, 0.001, cap=0.0)  # every threshold capped at 0: everything kept
    assert torch.equal(capped, labels)


def test_alpha_and_beta_schedules_are_the_reference_formulas():
    # adjust_alpha / adjust_beta of parquets/DUDA trainers/uda_trainer.py with 80000 iterations.
    def ref_alpha(it):
        return 0.2 if it < 2000 else 0.2 + ((it - 2000) / 78000) ** 1.1 * 0.5

    def ref_beta(it):
        return 0.25 if it < 10000 else 0.25 + ((it - 5000) / 75000) ** 1.1 * 0.5

    from uda_plugins.methods.duda import DUDA

    duda = DUDA.__new__(DUDA)  # the schedules only read these attributes
    duda.length, duda.power = 80000, 1.1
    duda.alpha_range, duda.alpha_ramp_start = (0.2, 0.7), 2000
    duda.beta_range, duda.beta_ramp_start, duda.update_start = (0.25, 0.75), 5000, 10000
    for it in (0, 1999, 2000, 5000, 9999, 10000, 41000, 79999, 80000):
        assert duda.alpha(it) == pytest.approx(ref_alpha(it)), it
        assert duda.beta(it) == pytest.approx(ref_beta(it)), it
    assert duda.beta(10000) == pytest.approx(0.2754, abs=1e-4)
    assert ramp(5, 0.0, 1.0, 10, 10, 1.0) == 1.0  # a ramp with no length is at its end


def _reference_sce(logits, target, alpha=0.2, beta=1.0, num_classes=4):
    # SymmetricCrossEntropyLoss2d of parquets/DUDA models/losses/seg_loss.py, as written there.
    ce = F.cross_entropy(logits, target, ignore_index=255)
    pred = F.softmax(logits, dim=1).clamp(min=1e-7, max=1.0)
    mask = (target != 255).float()
    labels = target.clone()
    labels[labels == 255] = num_classes
    one_hot = F.one_hot(labels, num_classes + 1).float()
    one_hot = one_hot.permute(0, 3, 1, 2)[:, :-1].clamp(min=1e-4, max=1.0)
    rce = -(torch.sum(pred * torch.log(one_hot), dim=1) * mask).sum() / (mask.sum() + 1e-6)
    return alpha * ce + beta * rce


def test_symmetric_cross_entropy_equals_the_reference():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 6, 7, generator=g)
    target = torch.randint(0, 4, (2, 6, 7), generator=g)
    target[0, :2] = 255
    assert float(symmetric_cross_entropy(logits, target)) == pytest.approx(
        float(_reference_sce(logits, target)), rel=1e-5
    )
    # no labelled pixel: 0, not NaN
    assert float(symmetric_cross_entropy(logits, torch.full_like(target, 255))) == 0.0


def test_iast_regularisers_equal_the_reference():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 4, 6, generator=g)
    weight = (torch.rand(2, 4, 6, generator=g) > 0.4).float()
    p = F.softmax(logits, 1)
    entropy = -(p * torch.log(p + 1e-8)).sum(1)
    n = weight.sum() * 5
    assert float(entropy_regularizer(logits, weight)) == pytest.approx(float((entropy * weight).sum() / n), rel=1e-5)
    kld = ((-1.0 / 5) * F.log_softmax(logits, 1)).sum(1)
    assert float(kld_uniform_regularizer(logits, weight)) == pytest.approx(float((kld * weight).sum() / n), rel=1e-5)
    assert float(entropy_regularizer(logits, torch.zeros_like(weight))) == 0.0


def test_teacher_alpha_one_is_the_uniform_mean_of_averaged_model():
    from torch.optim.swa_utils import AveragedModel

    from uda_plugins.methods.teacher import ema_alpha, ema_update_, make_teacher

    student = torch.nn.Linear(3, 2)
    teacher, reference = make_teacher(student), AveragedModel(student)
    reference.update_parameters(student)  # as parquets/DUDA: the average starts with the initial weights
    for k in range(1, 6):
        with torch.no_grad():
            student.weight.add_(torch.randn(2, 3))
        ema_update_(teacher, student, ema_alpha(k, 1.0))
        reference.update_parameters(student)
        torch.testing.assert_close(teacher.weight, reference.module.weight)


def _reference_ias(confidence, prediction, thresholds, alpha, beta, gamma):
    new = np.ones_like(thresholds)
    for c in range(len(thresholds)):
        values = [thresholds[c]] + list(confidence[prediction == c])
        new[c] = np.quantile(values, 1 - alpha * thresholds[c] ** gamma)
    thresholds = beta * thresholds + (1 - beta) * new
    thresholds[thresholds >= 1] = 0.999
    label = prediction.copy()
    label[confidence < thresholds[prediction]] = 255
    return label, thresholds


def test_instance_adaptive_selection_follows_iast():
    rng = np.random.default_rng(4)
    selector = InstanceAdaptiveSelector(3, proportion=0.45, momentum=0.9, gamma=8.0)
    thresholds = np.full(3, 0.9)
    for _ in range(4):  # the thresholds are a running state over the images
        confidence = rng.uniform(0.3, 1.0, (8, 9))
        prediction = rng.integers(0, 3, (8, 9))
        label = selector(confidence, prediction)
        expected, thresholds = _reference_ias(confidence, prediction, thresholds, 0.45, 0.9, 8.0)
        assert label.dtype == np.uint8 and np.array_equal(label, expected)
        np.testing.assert_allclose(selector.thresholds, thresholds)


# ---------------------------------------------------------------------------------------------- training
TINY = {
    "INPUT.TARGET.CROP_SIZE": "(32, 64)",
    "UDA.DUDA.SOURCE_WARMUP_ITERS": 2,
    "UDA.DUDA.UPDATE_START": 1,
    "UDA.DUDA.ALPHA_RAMP_START": 1,
    "UDA.DUDA.BETA_RAMP_START": 0,
    "SOLVER.MAX_ITER": 6,
    "TEST.EVAL_PERIOD": 0,
}


def _bank_files(out):
    root = os.path.join(out, "pseudo_label_bank", "synthetic_tiny_target_train")
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if "@" in f)


def _train(out, **extra):
    assert train_net.cli(["--config-file", CONFIG] + tiny_overrides(out, **dict(TINY, **extra))) == 0


def test_bank_is_filled_after_the_warmup_and_rewritten_per_batch(tmp_path):
    from test_train_net import _event_tags

    out = str(tmp_path / "duda")
    _train(out, VIS_PERIOD=3)
    files = _bank_files(out)
    versions = sorted({int(f.split("@")[1][:-4]) for f in files})
    # 24 images filled at iteration 2 (version 0); steps 3..5 rewrite their 2 images each (versions 4..6).
    assert versions[0] == 0 and set(versions[1:]) <= {4, 5, 6} and 6 in versions
    assert sum(f.endswith("@0.png") for f in files) >= 24 - 6
    acc = _event_tags(out)
    scalars = set(acc.Tags()["scalars"])
    assert {"loss_offline", "loss_consistency", "loss_online", "loss_entropy", "loss_kld", "duda_alpha"} <= scalars
    assert {"source/input_gt_pred", "target/crop_offline_online_teacher_pred"} <= set(acc.Tags()["images"])
    target = acc.Images("target/crop_offline_online_teacher_pred")[0]
    assert target.width == 5 * 64 and target.height == 32
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    assert int(state["model"]["ema_updates"]) == 6 - 2  # the mean counts self-training steps only


def test_periodic_refresh_and_an_initial_folder(tmp_path):
    from uda_plugins.data.build import get_dataset_dicts
    from uda_plugins.data.pseudo_label_bank import bank_keys, write_label_atomic

    initial = tmp_path / "initial"
    dicts = get_dataset_dicts(["synthetic_tiny_target_train"])
    for d, key in zip(dicts, bank_keys([d["file_name"] for d in dicts])):
        # named like the image file, flat (the authors' layout)
        write_label_atomic(
            str(initial / (os.path.basename(key) + ".png")), np.full((d["height"], d["width"]), 7, np.uint8)
        )
    out = str(tmp_path / "duda")
    _train(
        out,
        **{
            "UDA.DUDA.SOURCE_WARMUP_ITERS": 0,
            "UDA.PSEUDO_LABEL_BANK.INITIAL_DIR": str(initial),
            "UDA.DUDA.UPDATE_MODE": "periodic",
            "UDA.DUDA.REFRESH_PERIOD": 4,
        },
    )
    files = _bank_files(out)
    # Refreshed at self-training iterations 1 and 5 (versions 2 and 6): every image rewritten each time.
    assert sum(f.endswith("@6.png") for f in files) == 24
    # The first refresh is still referenced by the checkpoints after iterations 1 and 3 (pinned).
    assert sum(f.endswith("@2.png") for f in files) == 24 and len(files) == 48


def test_generate_tool_makes_an_initial_bank_that_duda_starts_from(tmp_path):
    import cv2
    import generate_pseudo_labels

    source_only = str(tmp_path / "source_only")
    config = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")
    # IAST's thresholds start at 0.9, so the model must be confident somewhere after its 40 iterations: at 5x the
    # synthetic rate its loss falls from 2.4 to 0.7 (at 1x, from a classifier initialised N(0, 0.01) as mmcv's, only to
    # 2.0: the bank kept 3e-5 of the pixels).
    warm_up = {"TEST.EVAL_PERIOD": 0, "SOLVER.MAX_ITER": 40, "SOLVER.CHECKPOINT_PERIOD": 100, "SOLVER.BASE_LR": 0.01}
    assert train_net.cli(["--config-file", config] + tiny_overrides(source_only, **warm_up)) == 0
    weights = os.path.join(source_only, "model_final.pth")
    initial = str(tmp_path / "initial")
    argv = ["--config-file", CONFIG, "--output", initial]
    overrides = tiny_overrides(str(tmp_path / "unused"), **TINY)
    assert generate_pseudo_labels.main(argv + overrides + ["MODEL.WEIGHTS", weights]) == 0
    labels = sorted(os.path.relpath(os.path.join(d, f), initial) for d, _, fs in os.walk(initial) for f in fs)
    assert len(labels) == 25 and "class_thresholds.json" in labels
    with open(os.path.join(initial, "class_thresholds.json")) as f:
        summary = json.load(f)
    assert summary["images"] == 24 and 0 < summary["kept_fraction"] < 1 and summary["ias"]["proportion"] == 0.45
    first = cv2.imread(os.path.join(initial, labels[0]), cv2.IMREAD_UNCHANGED)
    assert first.dtype == np.uint8 and set(np.unique(first)) - {255} <= set(range(19))

    out = str(tmp_path / "duda")
    _train(
        out,
        **{
            "UDA.DUDA.SOURCE_WARMUP_ITERS": 0,
            "UDA.PSEUDO_LABEL_BANK.INITIAL_DIR": initial,
            "MODEL.WEIGHTS": weights,
            "SOLVER.MAX_ITER": 2,
            "UDA.DUDA.UPDATE_START": 5,
        },
    )
    bank = os.path.join(out, "pseudo_label_bank", "synthetic_tiny_target_train")
    for name in labels[:-1]:
        copied = cv2.imread(os.path.join(bank, name[: -len(".png")] + "@0.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(copied, cv2.imread(os.path.join(initial, name), cv2.IMREAD_UNCHANGED)), name
    assert generate_pseudo_labels.main(argv + ["--network", "guider"] + overrides) == 1  # fails with one line


def test_batch_norm_recalibration_averages_the_target_batches():
    from uda_plugins.methods.duda import recalibrate_batch_norm

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    net = Net().eval()
    g = torch.Generator().manual_seed(5)
    batches = [
        [{"image": (torch.rand(3, 8, 8, generator=g) * 150 + 40 * k).to(torch.uint8)} for _ in range(2)]
        for k in range(3)
    ]
    assert recalibrate_batch_norm(net, batches, lambda x: x / 255.0) == 1
    assert not net.training  # the mode is restored
    with torch.no_grad():
        means = [net.conv(torch.stack([d["image"] for d in b]).float() / 255.0).mean((0, 2, 3)) for b in batches]
    torch.testing.assert_close(net.bn.running_mean, torch.stack(means).mean(0))
    assert recalibrate_batch_norm(torch.nn.Conv2d(3, 3, 1), batches, lambda x: x) == 0  # nothing to re-estimate


def _duda_model(tmp_path, **extra):
    """The synthetic DUDA config's model as training builds it, self-training from the first iteration."""
    from uda_plugins.engine import UDATrainer
    from uda_plugins.engine.setup import load_cfg

    cfg, _ = load_cfg(CONFIG, tiny_overrides(str(tmp_path), **{"UDA.DUDA.SOURCE_WARMUP_ITERS": 0, **extra}))
    return cfg, UDATrainer.build_model(cfg)


def _batch_norms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_batch_norm_as_released_freezes_the_affine_parameters_not_the_statistics(tmp_path):
    # parquets/DUDA models/backbones/resnet.py:73-83,133-134 (fix_bn: requires_grad False on the BN affine),
    # models/GeneralSegmentor.py:49-58 (those parameters left out of SGD), trainers/uda_trainer.py:86-91,309
    # (model.train() every step: the layers normalise with batch statistics).
    from uda_plugins.engine import UDATrainer

    cfg, model = _duda_model(tmp_path / "released")
    norms = _batch_norms(model.student)
    assert norms and all(not m.weight.requires_grad and not m.bias.requires_grad for m in norms)
    optimized = {id(p) for group in UDATrainer.build_optimizer(cfg, model).param_groups for p in group["params"]}
    assert not optimized & {id(p) for m in norms for p in (m.weight, m.bias)}
    model.train()
    assert all(m.training for m in norms) and not model.teacher.training
    before = norms[0].running_mean.clone()
    model.student.forward_train(model.student.normalize(torch.rand(2, 3, 32, 64) * 255))
    assert not torch.equal(norms[0].running_mean, before)  # batch statistics, which also move the running ones
    # The former behaviour: statistics frozen (eval mode), the affine trained.
    _, frozen = _duda_model(tmp_path / "statistics", **{"UDA.DUDA.BATCH_NORM": "frozen_statistics"})
    frozen._freeze_student_bn()  # what the first self-training step does
    frozen.train()
    assert all(not m.training and m.weight.requires_grad for m in _batch_norms(frozen.student))


def test_the_mean_teacher_forwards_as_released(tmp_path):
    # trainers/uda_trainer.py:309 mean_model.train(); :331 mean_model(crops), the output discarded; :332
    # mean_model(full images), the consistency target; :645-647 mean_model.eval() and a forward on the full images
    # for the online labels and the bank rewrite (:649-654), with the statistics the two train-mode calls moved.
    import copy

    _, model = _duda_model(tmp_path, **{"MODEL.SEM_SEG_HEAD.DROPOUT": 0.5})
    model.train()
    reference = copy.deepcopy(model.teacher)
    g = torch.Generator().manual_seed(0)
    crops, full = torch.randn(2, 3, 32, 64, generator=g), torch.randn(2, 3, 48, 96, generator=g)

    def upsampled(x):  # models/predictors/upsample_predictor.py:17
        return F.interpolate(x, size=full.shape[-2:], mode="bilinear", align_corners=True)

    with torch.no_grad():
        torch.manual_seed(3)
        target = model._teacher_train_mode_forwards(crops, full)
        online = model._whole_image_logits(full)
        torch.manual_seed(3)
        reference.train()
        reference(crops)
        expected_target = upsampled(reference(full))
        reference.eval()
        expected_online = upsampled(reference(full))
    assert not model.teacher.training
    assert torch.equal(target, expected_target.float()) and torch.equal(online, expected_online)
    assert not torch.allclose(target, online)  # batch statistics and dropout against running statistics
    for mine, theirs in zip(model.teacher.buffers(), reference.buffers()):
        assert torch.equal(mine, theirs)
    _, eval_only = _duda_model(tmp_path / "eval", **{"UDA.DUDA.TEACHER_FORWARDS": "eval"})
    assert eval_only._teacher_train_mode_forwards(crops, full) is None


def test_the_mean_teachers_buffers_follow_the_student_as_averaged_model_does(tmp_path):
    # torch >= 1.13 AveragedModel.update_parameters (use_buffers=False) copies the model's buffers after averaging
    # the parameters (pytorch#84054): the release's mean model gets the student's BatchNorm statistics every step.
    from torch.optim.swa_utils import AveragedModel

    from uda_plugins.d2 import EventStorage

    _, model = _duda_model(tmp_path)
    reference = AveragedModel(model.student)
    with torch.no_grad():
        for m in _batch_norms(model.student):
            m.running_mean.add_(torch.rand_like(m.running_mean))
    with EventStorage(0):
        model.update_teacher()
    reference.update_parameters(model.student)
    for mine, theirs in zip(model.teacher.buffers(), reference.module.buffers()):
        assert torch.equal(mine, theirs)
    _, own = _duda_model(tmp_path / "own", **{"UDA.DUDA.TEACHER_BUFFERS": "own"})
    before = [b.clone() for b in own.teacher.buffers()]
    with torch.no_grad():
        for m in _batch_norms(own.student):
            m.running_mean.add_(1.0)
    with EventStorage(0):
        own.update_teacher()
    assert all(torch.equal(a, b) for a, b in zip(own.teacher.buffers(), before))


def test_logits_are_carried_to_the_crop_then_softmaxed_with_aligned_corners(tmp_path):
    # trainers/uda_trainer.py:205-218 full2weak_logits: each whole-image logit map resized to the sample's scaled size
    # (bilinear, align_corners=True), cropped, flipped; the softmax comes after (get_consistancy_loss, :641).
    from uda_plugins.data.transforms import Geometry

    _, model = _duda_model(tmp_path)
    g = torch.Generator().manual_seed(1)
    full_logits = torch.randn(2, 19, 48, 96, generator=g)
    geometries = [
        Geometry((48, 96), (61, 122), (5, 9, 32, 64), True),
        Geometry((48, 96), (40, 80), (8, 16, 32, 64), False),
    ]
    dicts = [{"geometry": geometry.to_dict()} for geometry in geometries]
    expected = []
    for i, geometry in enumerate(geometries):
        (h, w), (y1, x1, th, tw) = geometry.resized_size, geometry.crop
        feat = F.interpolate(full_logits[i : i + 1], size=[h, w], mode="bilinear", align_corners=True)
        feat = feat[:, :, y1 : y1 + th, x1 : x1 + tw]
        expected.append(torch.flip(feat, [3]) if geometry.flip else feat)
    expected = torch.softmax(torch.cat(expected), dim=1)
    torch.testing.assert_close(model._carried_to_crops(full_logits, dicts), expected)
    _, fixed = _duda_model(tmp_path / "fixed", **{"UDA.DUDA.RESAMPLE_AS_RELEASED": False})
    carried = fixed._carried_to_crops(full_logits, dicts)
    assert torch.allclose(carried.sum(1), torch.ones(2, 32, 64)) and not torch.allclose(carried, expected, atol=1e-3)


def test_the_source_loss_averages_over_the_labelled_pixels_as_released(tmp_path):
    # trainers/uda_trainer.py:38,316: nn.CrossEntropyLoss(ignore_index=255), a mean over the labelled pixels.
    _, model = _duda_model(tmp_path, **{"MODEL.SEM_SEG_HEAD.LOSS_AVERAGE": "labelled_pixels"})
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 19, 12, 24, generator=g)
    labels = torch.randint(0, 19, (2, 48, 96), generator=g)
    labels[:, :20] = IGN
    upsampled = F.interpolate(logits, size=(48, 96), mode="bilinear", align_corners=False)
    expected = torch.nn.CrossEntropyLoss(ignore_index=IGN)(upsampled, labels)
    from uda_plugins.modeling.segmentor import SegmentorOutput

    torch.testing.assert_close(model.student.loss(SegmentorOutput(logits, {}), labels), expected)
