"""UDASS / QuadMix: the masks and the four mixes on hand-made tensors (confidence gate, fixed and reference class
exclusion, rare-object pasting), the class-list rare-class sampler and its loader stream, the previous-batch cache
(rotation, checkpoint round trip), the phase switch, a train_net run across it, and an exact resume in phase B."""

import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_overrides

from uda_plugins.d2 import DetectionCheckpointer, EventStorage, build_model
from uda_plugins.data.build import build_uda_train_loader
from uda_plugins.data.samplers import RareClassSampler, listed_class_probs
from uda_plugins.methods.quad_mix import BatchCache, QuadMix
from uda_plugins.methods.quad_mix_masks import (
    Labelled,
    paste_objects,
    quad_mix,
    source_quad_masks,
    target_quad_masks,
)

sys.path.insert(0, os.path.join(REPO, "tools"))
import train_net  # noqa: E402

from uda_plugins.engine.metrics_log import read_metrics_log  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "synthetic", "quadmix.yaml")
KILLER = os.path.join(REPO, "tests", "kill_after_iteration.py")


# ---------------------------------------------------------------------------------------------------- masks
def test_source_mask_takes_whole_classes_and_never_the_ignore_label():
    torch.manual_seed(0)
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]], [[5, 5, 5, 5], [255, 255, 255, 255]]])
    for _ in range(30):
        masks, excluded = source_quad_masks(labels, classes_per_mask=2, ignore_label=255)
        for label, mask, chosen in zip(labels, masks, excluded):
            classes = set(label.unique().tolist()) - {255}
            assert set(chosen.tolist()) <= classes and len(chosen) == min(2, len(classes))
            assert torch.equal(mask.bool(), torch.isin(label, chosen))  # whole classes
    # The reference may choose the ignore label, and hands the target mask positions in unique(label), not ids.
    seen = set()
    for _ in range(50):
        masks, excluded = source_quad_masks(labels, 2, 255, reference_quirks=True)
        seen |= set(labels[0][masks[0].bool()].tolist())
        assert all(int(p) < len(label.unique()) for label, e in zip(labels, excluded) for p in e)
    assert 255 in seen


def test_target_mask_excludes_the_source_classes_and_keeps_confident_pixels():
    torch.manual_seed(0)
    source_label = torch.tensor([[[3, 3, 7, 7]]])  # two classes: always both chosen, at positions 0 and 1
    pseudo = torch.tensor([[[0, 1, 3, 7], [0, 1, 3, 7]]])
    confident = torch.tensor([[[True, True, True, True], [False, True, False, True]]])
    _, fixed = source_quad_masks(source_label, 2)
    _, reference = source_quad_masks(source_label, 2, reference_quirks=True)
    assert sorted(fixed[0].tolist()) == [3, 7] and sorted(reference[0].tolist()) == [0, 1]
    # Fixed: classes 3 and 7 are excluded, so 0 and 1 are chosen; the reference excludes "0" and "1" instead.
    mask = target_quad_masks(pseudo, confident, fixed, 2)
    expected = torch.isin(pseudo, torch.tensor([0, 1])) & confident
    assert torch.equal(mask.bool(), expected)
    mask = target_quad_masks(pseudo, confident, reference, 2)
    assert torch.equal(mask.bool(), torch.isin(pseudo, torch.tensor([3, 7])) & confident)
    # One class left: one chosen; none left: an empty mask.
    mask = target_quad_masks(torch.tensor([[[3, 7, 5, 5]]]), torch.ones(1, 1, 4, dtype=torch.bool), fixed, 2)
    assert mask.tolist() == [[[0.0, 0.0, 1.0, 1.0]]]
    mask = target_quad_masks(torch.tensor([[[3, 7, 7, 3]]]), torch.ones(1, 1, 4, dtype=torch.bool), fixed, 2)
    assert mask.sum() == 0


def _batch(value, label, weight, shape=(2, 2, 3)):
    n, h, w = shape
    return Labelled(
        torch.full((n, 3, h, w), float(value)), torch.full((n, h, w), label), torch.full((n, h, w), float(weight))
    )


def test_the_four_mixes():
    previous_source, source = _batch(1, 11, 1.0), _batch(2, 12, 1.0)
    previous_target, target = _batch(3, 13, 0.3), _batch(4, 14, 0.6)
    source_masks = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [1, 1, 1]]]).float()
    target_masks = torch.tensor([[[0, 1, 1], [0, 0, 0]], [[1, 0, 0], [0, 0, 1]]]).float()
    mixes = quad_mix(source_masks, target_masks, previous_source, source, previous_target, target)
    s, t = source_masks.bool(), target_masks.bool()

    def expect(mask, fg, bg):
        return torch.where(mask, fg, bg)

    # S2S / S2T: the previous source's classes over the current source / target (weight 1 there, q elsewhere).
    assert torch.equal(mixes.ss.image[:, 0], expect(s, 1.0, 2.0)) and torch.equal(mixes.ss.label, expect(s, 11, 12))
    assert torch.equal(mixes.ss.weight, torch.ones(2, 2, 3))
    assert torch.equal(mixes.st.image[:, 2], expect(s, 1.0, 4.0)) and torch.equal(mixes.st.label, expect(s, 11, 14))
    assert torch.equal(mixes.st.weight, expect(s, 1.0, 0.6))
    # T2SS / T2ST: the previous target's confident classes on top, with its pseudo-label weight q'.
    assert torch.equal(mixes.tss.image[:, 1], expect(t, 3.0, expect(s, 1.0, 2.0)))
    assert torch.equal(mixes.tss.label, expect(t, 13, expect(s, 11, 12)))
    assert torch.equal(mixes.tss.weight, expect(t, 0.3, 1.0))
    assert torch.equal(mixes.tst.image[:, 0], expect(t, 3.0, expect(s, 1.0, 4.0)))
    assert torch.equal(mixes.tst.label, expect(t, 13, expect(s, 11, 14)))
    assert torch.equal(mixes.tst.weight, expect(t, 0.3, expect(s, 1.0, 0.6)))


def test_rare_objects_are_pasted_on_top_with_weight_one():
    base = _batch(0, 1, 0.5, shape=(1, 1, 4))
    images = torch.stack([torch.full((1, 3, 1, 4), 7.0), torch.full((1, 3, 1, 4), 9.0)], dim=1)  # (1, 2, 3, 1, 4)
    labels = torch.tensor([[[[5, 5, 2, 255]], [[2, 6, 6, 5]]]])  # only the drawn class's pixels are pasted
    classes = torch.tensor([[5, 6]])
    out = paste_objects(base, images, labels, classes)
    assert out.label.tolist() == [[[5, 6, 6, 1]]]  # the second object lies on top of the first
    assert out.image[0, 0].tolist() == [[7.0, 9.0, 9.0, 0.0]]
    assert out.weight.tolist() == [[[1.0, 1.0, 1.0, 0.5]]]
    quirk = paste_objects(base, images, labels, classes, keep_weight=True)  # the reference: the weight beneath
    assert quirk.weight.tolist() == [[[0.5, 0.5, 0.5, 0.5]]] and torch.equal(quirk.label, out.label)


# ------------------------------------------------------------------------------------------- class-list sampler
def test_class_list_sampler_draws_classes_by_multiplicity_and_drops_absent_ones(caplog):
    rng = np.random.default_rng(0)
    pixels = np.zeros((40, 6), dtype=np.int64)
    pixels[:, 0] = 5_000
    pixels[rng.random(40) < 0.5, 1] = 40
    pixels[:10, 2] = [60] * 5 + [5] * 5  # only the first five have more than min_pixels
    pixels[:, 3] = 2  # present everywhere, never above min_pixels
    with caplog.at_level(logging.WARNING, logger="uda_plugins.data.samplers"):
        sampler = RareClassSampler(pixels, 0.01, 10, list("abcdef"), class_list=[1, 1, 2, 3, 5, 1])
    assert "d, f; these classes are not drawn" in caplog.text  # 3: too few pixels; 5: never in the source
    np.testing.assert_allclose(sampler.class_probs, [0, 3 / 4, 1 / 4, 0, 0, 0])
    assert sampler.images_with_class(2).tolist() == [0, 1, 2, 3, 4]
    n = 20_000
    draws = [sampler.sample(np.random.default_rng([7, i])) for i in range(n)]
    observed = np.bincount([c for _, c in draws], minlength=6) / n
    np.testing.assert_allclose(observed, sampler.class_probs, atol=0.015)
    assert all(pixels[i, c] > 10 for i, c in draws)
    with pytest.raises(ValueError, match=r"\[19\]"):
        listed_class_probs([3, 19], 19)
    with pytest.raises(ValueError, match="UDA.QUADMIX.RARE_MIN_PIXELS"):
        RareClassSampler(pixels, 0.01, 10, class_list=[3, 5])


# ---------------------------------------------------------------------------------------------- on the tiny pair
def _cfg(tmp_path, **extra):
    from uda_plugins.config import get_uda_cfg

    cfg = get_uda_cfg()
    cfg.merge_from_file(CONFIG)
    values = {
        "UDA.QUADMIX.START_ITER": 2,
        "UDA.MIC.BLOCK_SIZE": 16,
        "DATALOADER.RCS.STATS_DIR": str(tmp_path / "stats"),
    }
    cfg.merge_from_list(tiny_overrides(str(tmp_path / "out"), **dict(values, **extra)))
    return cfg


def _loader_batches(cfg, start=0, count=4):
    loader = build_uda_train_loader(cfg, QuadMix.data_requirements)
    loader.set_start_iter(start)
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


def test_paste_stream_is_a_function_of_position_and_starts_with_phase_b(tmp_path):
    cfg = _cfg(tmp_path)
    batches = _loader_batches(cfg)
    assert [len(b["source_paste"]) for b in batches] == [0, 0, 8, 8]  # 2 targets x (T2SS, T2ST) x 2 objects
    again = _loader_batches(cfg, start=3, count=1)[0]  # a resumed loader reads the same objects
    for a, b in zip(batches[3]["source_paste"], again["source_paste"]):
        assert a["file_name"] == b["file_name"] and torch.equal(a["image"], b["image"])
    for sample in batches[2]["source_paste"] + batches[3]["source_paste"]:
        assert sample["rcs_class"] in (5, 7, 11) and sample["image"].shape[-2:] == sample["sem_seg"].shape
    # The crop is re-drawn until the object is there (the tiny images are never cropped: it always is).
    assert all((s["sem_seg"] == s["rcs_class"]).sum() > 10 for s in batches[2]["source_paste"])
    cfg = _cfg(tmp_path, **{"UDA.QUADMIX.PASTE_PER_IMAGE": 0})
    assert "source_paste" not in _loader_batches(cfg, start=2, count=1)[0]


def _step(model, batch, iteration):
    with EventStorage(iteration):
        return model(batch)


def test_phase_switch_and_cache_rotation(tmp_path):
    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batches = _loader_batches(cfg, count=4)

    losses = _step(model, batches[0], 0)
    assert "loss_mix" in losses and "loss_quad_ss" not in losses
    assert model.previous.is_empty()  # not kept before START_ITER - 1
    losses = _step(model, batches[1], 1)
    assert "loss_mix" in losses and not model.previous.is_empty()

    for it in (2, 3):
        losses = _step(model, batches[it], it)
        assert {"loss_source", "loss_quad_ss", "loss_quad_st", "loss_mic"} <= set(losses)
        assert "loss_mix" not in losses
        assert all(torch.isfinite(v) for v in losses.values())
        # The cache now holds this step's batch: the images, labels and the teacher's view of the target.
        src_images, src_labels = model.images_and_labels(batches[it]["source"])
        tgt_images, _ = model.images_and_labels(batches[it]["target"][0])
        labels, weight, confidence, _ = model.pseudo_labels(tgt_images, batches[it]["target"][0])
        cached = model.previous.read()
        assert torch.equal(cached["source_images"], src_images) and torch.equal(cached["source_labels"], src_labels)
        assert torch.equal(cached["target_images"], tgt_images) and torch.equal(cached["pseudo_labels"], labels)
        assert torch.equal(cached["confident"], confidence >= 0.9) and torch.equal(cached["pseudo_weight"], weight)
        assert not any(t.requires_grad for t in cached.values())

    # A phase-B step without a cached batch (weights loaded at or after START_ITER) is a DACS step and fills it.
    model.previous.clear()
    losses = _step(model, batches[3], 5)
    assert "loss_mix" in losses and "loss_quad_ss" not in losses and not model.previous.is_empty()


def test_cache_survives_a_checkpoint_whatever_its_shape(tmp_path):
    cfg = _cfg(tmp_path)
    model = build_model(cfg)
    model.train()
    for it, batch in enumerate(_loader_batches(cfg, count=3)):
        _step(model, batch, it)
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model": model.state_dict()}, path)

    fresh = build_model(cfg)  # an empty cache: its buffers have no shape yet
    assert not any(k.startswith("previous.") for k in fresh.state_dict())
    DetectionCheckpointer(fresh).load(path)
    for key, value in model.previous.read().items():
        assert torch.equal(fresh.previous.read()[key], value), key
    # A checkpoint without a cache (saved before it was filled) empties it, silently.
    torch.save({"model": build_model(cfg).state_dict()}, path)
    incompatible = fresh.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    assert not incompatible.missing_keys and fresh.previous.is_empty()


def test_batch_cache_slots_for_gradient_accumulation():
    cache = BatchCache(("x", "y"), slots=2)
    assert cache.read(1) is None
    cache.write(0, x=torch.ones(2, 3), y=torch.zeros(2, dtype=torch.bool))
    cache.write(1, x=torch.full((2, 3), 2.0), y=torch.ones(2, dtype=torch.bool))
    assert cache.x.shape == (4, 3) and cache.read(0)["x"].eq(1).all() and cache.read(1)["y"].all()
    kept = cache.read(0)["x"]
    cache.write(0, x=torch.full((2, 3), 5.0), y=torch.zeros(2, dtype=torch.bool))
    assert kept.eq(1).all() and cache.read(1)["x"].eq(2).all()  # earlier reads stay valid; slot 1 kept
    with pytest.raises(IndexError):
        cache.read(2)


# ------------------------------------------------------------------------------------------------- train_net
def _run(out, extra, *flags):
    args = ["--config-file", CONFIG, *flags] + tiny_overrides(out, **extra)
    assert train_net.cli(args) == 0


def _quad_overrides(tmp_path, **extra):
    values = {
        "UDA.QUADMIX.START_ITER": 2,
        "UDA.MIC.BLOCK_SIZE": 16,
        "DATALOADER.RCS.STATS_DIR": str(tmp_path / "stats"),
        "TEST.EVAL_PERIOD": 0,
    }
    values.update(extra)
    return values


def test_quadmix_trains_across_the_switch_and_resumes_exactly_in_phase_b(tmp_path):
    from test_train_net import _event_tags

    # With the teacher reset of the release (Q2) before iteration 4: the resumed run below crosses it.
    extra = _quad_overrides(
        tmp_path,
        **{
            "SOLVER.MAX_ITER": 7,
            "SOLVER.CHECKPOINT_PERIOD": 3,
            "VIS_PERIOD": 1,
            "UDA.QUADMIX.RESET_TEACHER": True,
            "UDA.QUADMIX.RESET_TEACHER_ITER": 4,
        },
    )
    full = str(tmp_path / "full")
    _run(full, extra)
    with open(os.path.join(full, "log.txt")) as f:
        assert "the teacher's parameters are the student's from iteration 4 on" in f.read()
    records = [r for r in read_metrics_log(os.path.join(full, "metrics.json")) if "total_loss" in r]
    assert [r["iteration"] for r in records if "loss_mix" in r] == [0, 1]
    assert [r["iteration"] for r in records if "loss_quad_ss" in r and "loss_quad_st" in r] == list(range(2, 7))
    images = set(_event_tags(full).Tags()["images"])
    assert {"quad/t2ss_input_label_weight_pred", "quad/t2st_input_label_weight_pred"} <= images
    assert {"quad/s2s_s2t_sourcemask_targetmask", "mix/input_mask_label_weight_pred"} <= images

    # SIGKILLed after iteration 4: resumed from the checkpoint of iteration 2, the first of phase B, whose cache
    # holds iteration 2's batch, and before the teacher reset; the final weights (teacher and cache included) equal
    # the uninterrupted run's, bit for bit.
    resumed = str(tmp_path / "resumed")
    args = ["--config-file", CONFIG] + tiny_overrides(resumed, **extra)
    killed = subprocess.run([sys.executable, KILLER, "4", *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoint = torch.load(os.path.join(resumed, "model_0000002.pth"), map_location="cpu", weights_only=True)
    assert checkpoint["model"]["previous.source_images"].shape == (2, 3, 48, 96)
    _run(resumed, extra, "--resume")
    with open(os.path.join(resumed, "log.txt")) as f:
        assert "Starting training from iteration 3" in f.read()
    a = torch.load(os.path.join(full, "model_final.pth"), map_location="cpu", weights_only=True)["model"]
    b = torch.load(os.path.join(resumed, "model_final.pth"), map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys() and "previous.pseudo_labels" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_processes_equal_one_with_accumulation(tmp_path):
    """Each rank mixes its own previous batch and objects; micro-batch m of an accumulating process mixes with
    micro-batch m of its previous step: the same computation."""
    from test_distributed import (
        ITERS,
        SGD_UPDATES,
        _assert_same_losses,
        _assert_same_updates,
        _initial_checkpoint,
        _losses,
        _overrides,
    )

    extra = _quad_overrides(tmp_path, **{"UDA.QUADMIX.START_ITER": 1, **SGD_UPDATES})
    init_overrides = _overrides(str(tmp_path / "init"), **extra)
    extra["MODEL.WEIGHTS"] = _initial_checkpoint(CONFIG, init_overrides, tmp_path / "i.pth")
    ddp = str(tmp_path / "ddp")
    assert (
        train_net.cli(["--config-file", CONFIG, "--num-gpus", "2", "--dist-url", "auto"] + _overrides(ddp, **extra))
        == 0
    )
    accumulated = str(tmp_path / "accumulated")
    overrides = _overrides(accumulated, **extra, **{"SOLVER.GRAD_ACCUMULATION_STEPS": 2})
    assert train_net.cli(["--config-file", CONFIG] + overrides) == 0
    losses = _losses(ddp)
    assert ITERS >= 3 and "loss_quad_ss" in losses[2] and "loss_mix" in losses[0]
    _assert_same_losses(losses, _losses(accumulated))
    init = torch.load(extra["MODEL.WEIGHTS"], weights_only=True)["model"]
    a = torch.load(os.path.join(ddp, "model_final.pth"), weights_only=True)["model"]
    b = torch.load(os.path.join(accumulated, "model_final.pth"), weights_only=True)["model"]
    assert b["previous.source_images"].shape[0] == 2 * a["previous.source_images"].shape[0]  # one slot per micro-batch
    # The checkpoint holds rank 0's cache of the previous batch, the accumulating run's both slots. The student's
    # forwards per step and process (2 images of 48x96 each): source, ClassMix, MIC's masked image and the four quads.
    skip = lambda key: key.startswith("previous.")  # noqa: E731
    _assert_same_updates(init, a, b, steps=ITERS, summed_terms=7 * 2 * 48 * 96, skip=skip)
