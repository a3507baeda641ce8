"""The self-training building blocks on hand-made tensors: pseudo-labels and the quality weight, margin rules,
ClassMix, strong augmentation, MIC masks, the feature distance and the EMA teacher."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uda_plugins.data.strong_aug import (
    apply_strong_aug,
    blur_kernel_size,
    gaussian_blur,
    sample_strong_aug,
)
from uda_plugins.data.transforms import Geometry
from uda_plugins.methods.class_mix import class_mix_masks, mix
from uda_plugins.methods.feature_distance import FeatureDistance, downscale_label_ratio
from uda_plugins.methods.masking import block_mask
from uda_plugins.methods.pseudo_labels import frame_margin_mask, ignore_crop_rows, pseudo_labels_from_logits
from uda_plugins.methods.teacher import ema_alpha, ema_update_, make_teacher

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)


# ------------------------------------------------------------------------------------------ pseudo-labels
def test_quality_weight_is_the_confident_fraction_of_the_whole_batch():
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 1, 0, 0] = 10.0  # one very confident pixel of class 1
    logits[1, 2, :, :] = 10.0  # a whole confident image of class 2
    logits[1, 2, 1, 1] = 0.0  # ... but one uniform pixel
    labels, confidence, weight = pseudo_labels_from_logits(logits, threshold=0.968)
    assert labels[0, 0, 0] == 1 and (labels[1, :1] == 2).all()
    assert confidence[0, 1, 1] == pytest.approx(1 / 3)
    # confident pixels: 1 in image 0 and 3 in image 1, over 8 pixels of the batch
    assert torch.allclose(weight, torch.full_like(weight, 4 / 8))


def test_crop_rows_and_frame_margins():
    w = ignore_crop_rows(torch.ones(1, 10, 4), top=2, bottom=3)
    assert w[0, :2].sum() == 0 and w[0, -3:].sum() == 0 and w[0, 2:7].eq(1).all()
    # A 20x40 frame with margins (top 2, bottom 4, left 3, right 5), cropped to rows 0..9, columns 30..39, flipped.
    g = Geometry((20, 40), (20, 40), (0, 30, 10, 10), True).to_dict()
    m = frame_margin_mask([g], (2, 4, 3, 5), torch.device("cpu"))[0]
    expected = torch.zeros(20, 40)
    expected[2:16, 3:35] = 1
    assert torch.equal(m, expected[0:10, 30:40].flip(-1))
    # Through a 2x downscale the margins shrink with the image.
    g = Geometry((20, 40), (10, 20), (0, 0, 10, 20), False).to_dict()
    m = frame_margin_mask([g], (2, 4, 4, 4), torch.device("cpu"))[0]
    assert m[0].sum() == 0 and m[1, 2:18].eq(1).all() and m[:, :2].sum() == 0 and m[-2:].sum() == 0


# ------------------------------------------------------------------------------------------------ ClassMix
def test_class_mix_pastes_half_of_each_image_classes():
    torch.manual_seed(0)
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]], [[5, 5, 5, 5], [7, 7, 7, 7]]])
    for _ in range(20):
        masks = class_mix_masks(labels, ignore_label=255)
        for img, m in zip(labels, masks):
            classes = [c for c in img.unique().tolist() if c != 255]
            chosen = img[m.bool()].unique().tolist()
            assert len(chosen) == math.ceil(len(classes) / 2) and set(chosen) <= set(classes)
            assert torch.equal(m.bool(), torch.isin(img, torch.tensor(chosen)))  # whole classes, never ignore
    src, tgt = torch.full((2, 3, 2, 4), 1.0), torch.full((2, 3, 2, 4), -1.0)
    mixed = mix(masks, src, tgt)
    assert torch.equal(mixed[:, 0], masks * 2 - 1)
    pseudo = torch.full((2, 2, 4), 9)
    mixed_label = mix(masks, labels, pseudo).long()
    assert torch.equal(mixed_label, torch.where(masks.bool(), labels, pseudo))
    weight = mix(masks, torch.ones(2, 2, 4), torch.full((2, 2, 4), 0.3))
    assert torch.allclose(weight, torch.where(masks.bool(), 1.0, 0.3))


def test_class_mix_reference_quirk_draws_from_the_whole_batch():
    torch.manual_seed(0)
    labels = torch.tensor([[[0, 0], [255, 255]], [[3, 3], [4, 4]]])
    seen = set()
    for _ in range(50):
        masks = class_mix_masks(labels, classes_from_batch=True)
        # 4 candidate "classes" batch-wide (0, 3, 4 and the ignore label): 2 chosen for every image
        seen |= set(labels[masks.bool()].tolist())
    assert 255 in seen  # the ignore label is pasted too, as in lhoyer/MIC


# -------------------------------------------------------------------------------------- strong augmentation
def _images(n=2, h=24, w=40):
    g = torch.Generator().manual_seed(1)
    rgb = torch.rand(n, 3, h, w, generator=g) * 255
    return (rgb - MEAN) / STD


def test_strong_aug_replays_exactly_and_skips_when_drawn_off():
    x = _images()
    params = sample_strong_aug(2, generator=torch.Generator().manual_seed(3))
    params.jitter, params.blur = True, True
    a = apply_strong_aug(x, params, MEAN, STD)
    b = apply_strong_aug(x.clone(), params, MEAN, STD)
    assert torch.equal(a, b) and not torch.allclose(a, x)
    alone = dataclasses.replace(
        params, **{f: getattr(params, f)[1:] for f in ("brightness", "contrast", "saturation", "hue", "order", "sigma")}
    )
    assert torch.equal(apply_strong_aug(x[1:], alone, MEAN, STD), a[1:])  # an image's draw is its own
    params.jitter, params.blur = False, False
    assert torch.equal(apply_strong_aug(x, params, MEAN, STD), x)


def test_strong_aug_draw_probabilities():
    g = torch.Generator().manual_seed(0)
    draws = [sample_strong_aug(1, generator=g) for _ in range(2000)]
    assert sum(d.jitter for d in draws) / 2000 == pytest.approx(0.8, abs=0.03)
    assert sum(d.blur for d in draws) / 2000 == pytest.approx(0.5, abs=0.03)
    b = torch.cat([d.brightness for d in draws])
    assert 0.8 <= b.min() and b.max() <= 1.2
    assert not any(d.blur for d in [sample_strong_aug(1, blur=False, generator=g) for _ in range(100)])


def test_color_jitter_identity_factors_keep_the_image():
    x = _images()
    params = sample_strong_aug(2, generator=torch.Generator().manual_seed(0))
    params.jitter, params.blur = True, False
    for t in (params.brightness, params.contrast, params.saturation):
        t.fill_(1.0)
    params.hue.fill_(0.0)
    assert torch.allclose(apply_strong_aug(x, params, MEAN, STD), x, atol=1e-3)
    # A full hue turn is the identity too; brightness +0.1 adds 25.5 grey levels (before clamping).
    params.hue.fill_(1.0)
    assert torch.allclose(apply_strong_aug(x, params, MEAN, STD), x, atol=1e-3)


def test_blur_kernel_and_gaussian():
    assert [blur_kernel_size(s) for s in (96, 192, 512, 1024, 48)] == [9, 19, 51, 103, 5]
    x = torch.zeros(1, 3, 21, 21)
    x[..., 10, 10] = 1.0
    y = gaussian_blur(x, torch.tensor([1.0]))
    assert y.sum() == pytest.approx(3.0, rel=1e-4) and y[0, 0, 10, 10] < 1  # mass preserved, spread
    assert torch.allclose(y[0, 0], y[0, 0].t(), atol=1e-6)  # isotropic (square image)


# ----------------------------------------------------------------------------------------------- MIC masks
def test_block_mask_ratio_and_blocks():
    torch.manual_seed(0)
    m = block_mask(64, 96, 192, block_size=16, ratio=0.7, device=torch.device("cpu"))
    assert m.shape == (64, 1, 96, 192)
    assert m.mean().item() == pytest.approx(0.3, abs=0.02)  # ~70% of the blocks dropped
    blocks = m[:, :, ::16, ::16]
    assert torch.equal(F.interpolate(blocks, scale_factor=16, mode="nearest"), m)  # constant on 16x16 blocks


# ----------------------------------------------------------------------------------------- feature distance
def test_downscale_label_ratio():
    labels = torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 255], [3, 3, 0, 0], [3, 4, 0, 0]]])
    out = downscale_label_ratio(labels, 2, 0.75, num_classes=5)
    assert out.tolist() == [[[1, 2], [3, 0]]]
    out = downscale_label_ratio(labels, 2, 0.9, num_classes=5)
    assert out.tolist() == [[[1, 255], [255, 0]]]


def test_feature_distance_on_thing_cells_only():
    encoder = nn.Conv2d(3, 4, 2, stride=2)  # a stand-in backbone returning {"res5": ...}

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = encoder

        def forward(self, x):
            return {"res5": self.conv(x)}

    fd = FeatureDistance(Enc(), weight=0.5, classes=[11], scale_min_ratio=0.75, feature="res5", num_classes=19)
    x = torch.randn(1, 3, 4, 4)
    frozen = fd.encoder(x)["res5"]
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 11  # one thing cell of four
    student = frozen.detach().clone()
    student[0, :, 0, 0] += torch.tensor([3.0, 4.0, 0.0, 0.0])  # distance 5 in the thing cell
    student[0, :, 1, 1] += 100.0  # stuff cells are not pulled
    assert fd(x, labels, student).item() == pytest.approx(0.5 * 5.0, rel=1e-5)
    assert fd(x, torch.zeros_like(labels), student).item() == 0.0  # no thing cell: 0, not NaN
    # Cells of label width // feature width that do not tile the features (the 2x2 feature map under 2x4 labels: cells
    # of 2 px, 1x2 of them) stop instead of broadcasting a (1, 1, 2) mask over (1, 2, 2).
    with pytest.raises(ValueError, match="do not cover the features"):
        fd(x, torch.zeros(1, 2, 4, dtype=torch.long), student)
    assert not any(p.requires_grad for p in fd.encoder.parameters())
    fd.train()
    assert not fd.encoder.training


# --------------------------------------------------------------------------------------------- EMA teacher
def test_ema_alpha_ramp_and_update():
    assert [ema_alpha(k, 0.99) for k in (1, 2, 3)] == [0.5, pytest.approx(2 / 3), 0.75]
    assert ema_alpha(10_000, 0.99) == 0.99
    student = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(7.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 0.75)
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.75 * b + 0.25 * s)
    assert teacher[1].running_mean.eq(0).all()  # buffers are not averaged


def test_bf16_autocast_forward_keeps_pseudo_labels_and_losses_in_fp32(tiny_cfg):
    from uda_plugins.d2 import EventStorage, build_model
    from uda_plugins.data.build import DataRequirements, build_uda_train_loader

    tiny_cfg.MODEL.META_ARCHITECTURE = "DACS"
    tiny_cfg.UDA.MIC.LAMBDA = 1.0
    tiny_cfg.UDA.MIC.BLOCK_SIZE = 16
    model = build_model(tiny_cfg)
    model.init_teacher()
    model.train()
    seen = {}
    model.student.head.register_forward_hook(lambda m, i, o: seen.update(head=o.dtype))
    original = model.pseudo_labels

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["pseudo"] = [t.dtype for t in out[:3]]  # labels, weights, confidence (the logits stay as computed)
        return out

    model.pseudo_labels = spy
    batch = next(iter(build_uda_train_loader(tiny_cfg, DataRequirements(target_labels=False), seed=0)))
    with EventStorage(0), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert seen["head"] == torch.bfloat16  # the network ran in bf16
    assert all(d in (torch.float32, torch.int64, torch.long) for d in seen["pseudo"])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
