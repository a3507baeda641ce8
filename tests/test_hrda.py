"""HRDA's multi-resolution segmentor (uda_plugins/modeling/hrda.py) on the tiny synthetic CNN."""

import pytest
import torch

from uda_plugins.modeling import build_segmentor, seg_cross_entropy, slide_inference, upsample_like
from uda_plugins.modeling.hrda import HRDASegmentor, crop, get_crop_box, slide_windows

H, W = 64, 128


def _model(cfg, head="DAFormerHead", **hrda) -> HRDASegmentor:
    """A seeded HRDA model on a copy of ``cfg`` with 32x64 detail crops and ``MODEL.HRDA`` overrides."""
    cfg = cfg.clone()
    cfg.MODEL.SEM_SEG_HEAD.NAME = head
    cfg.MODEL.HRDA.ENABLED = True
    cfg.MODEL.HRDA.HR_CROP_SIZE = (32, 64)
    cfg.MODEL.HRDA.ATTENTION_EMBED_DIM = 16
    for key, value in hrda.items():
        setattr(cfg.MODEL.HRDA, key, value)
    torch.manual_seed(0)
    model = build_segmentor(cfg)
    assert isinstance(model, HRDASegmentor)
    return model


def _images(n=2):
    return torch.randn(n, 3, H, W, generator=torch.Generator().manual_seed(1))


def _labels(n=2, classes=19):
    return torch.randint(0, classes, (n, H, W), generator=torch.Generator().manual_seed(2))


# ---------------------------------------------------------------------- crop box and windows
def test_crop_box_is_inside_divisible_and_covers_the_image():
    torch.manual_seed(0)
    boxes = [get_crop_box(H, W, (32, 48), divisible=8) for _ in range(600)]
    covered = torch.zeros(H, W, dtype=torch.bool)
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 and y2 <= H and 0 <= x1 and x2 <= W
        assert (y2 - y1, x2 - x1) == (32, 48)
        assert y1 % 8 == 0 and x1 % 8 == 0
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    assert {b[0] for b in boxes} == set(range(0, H - 32 + 1, 8))
    assert {b[2] for b in boxes} == set(range(0, W - 48 + 1, 8))

    # The reference's range never draws the last aligned offset, so the box never touches the bottom/right edge.
    ref = [get_crop_box(H, W, (32, 48), divisible=8, reference_offsets=True) for _ in range(600)]
    assert max(b[0] for b in ref) == H - 32 - 8 and max(b[2] for b in ref) == W - 48 - 8


def test_crop_box_is_clamped_and_drawn_from_torch_rng():
    state = torch.get_rng_state()
    assert get_crop_box(H, W, (512, 512), divisible=8) == (0, H, 0, W)
    assert get_crop_box(H, W, (0, 0), divisible=8) == (0, H, 0, W)
    assert torch.equal(state, torch.get_rng_state())  # no draw when the crop is the image, as the reference
    # margin 4 < divisible: only offset 0 (the reference's randint(0, 0) would raise)
    assert get_crop_box(H, W, (60, 512), divisible=8) == (0, 60, 0, W)
    torch.manual_seed(5)
    a = [get_crop_box(H, W, (32, 64), 8) for _ in range(5)]
    torch.manual_seed(5)
    assert a == [get_crop_box(H, W, (32, 64), 8) for _ in range(5)]


@pytest.mark.parametrize("size", [(64, 128), (96, 192), (40, 200), (16, 32)])
def test_slide_windows_cover_the_image(size):
    h, w = size
    windows = slide_windows(h, w, (32, 64), (16, 32))
    count = torch.zeros(h, w)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(32, h), min(64, w))
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1
    if h >= 64 and w >= 128:
        assert count.max() >= 4  # half-overlapping windows


# ---------------------------------------------------------------------- fusion
def test_attention_is_zero_outside_the_box_and_fused_is_upsampled_lr_there(tiny_cfg):
    model = _model(tiny_cfg).eval()  # eval: no dropout, so the pieces can be recomputed
    box = (0, 32, 0, 64)
    with torch.no_grad():
        out = model.forward_train(_images(), detail_box=box)
    assert out.extras["detail_box"] == box
    os = model.output_stride
    lr, hr, att = out.extras["lr_logits"], out.extras["hr_logits"], out.extras["attention"]
    grid = (H // os, W // os)
    assert out.logits.shape == (2, 19, *grid)
    assert hr.shape == (2, 19, 32 // os, 64 // os)
    assert att.shape == lr.shape  # class-wise attention on the context grid
    lr_box = [int(v * model.lr_scale) // os for v in box]  # box on the context logit grid
    assert att[..., lr_box[1] :, :].abs().max() == 0 and att[..., :, lr_box[3] :].abs().max() == 0
    assert att[..., : lr_box[1], : lr_box[3]].min() > 0

    inserted = torch.zeros_like(out.logits)
    inserted[..., : 32 // os, : 64 // os] = hr
    expected = upsample_like(att, grid) * inserted + upsample_like((1 - att) * lr, grid)
    torch.testing.assert_close(out.logits, expected)
    # Beyond one bilinear cell from the box the fused logits are the upsampled context logits.
    far = upsample_like(lr, grid)[..., 32 // os + 2 :, :]
    torch.testing.assert_close(out.logits[..., 32 // os + 2 :, :], far)


def test_fixed_attention_one_takes_the_detail_logits_inside_the_box(tiny_cfg):
    model = _model(tiny_cfg, FIXED_ATTENTION=1.0).eval()
    assert model.scale_attention_head is None
    with torch.no_grad():
        out = model.forward_train(_images(), detail_box=(16, 48, 32, 96))
    os = model.output_stride
    inner = out.logits[..., 16 // os + 2 : 48 // os - 2, 32 // os + 2 : 96 // os - 2]
    torch.testing.assert_close(inner, out.extras["hr_logits"][..., 2:-2, 2:-2])


# ---------------------------------------------------------------------- loss
def test_loss_weights(tiny_cfg):
    x, y = _images(), _labels()
    y[:, :5] = 255
    weight = torch.rand(2, H, W, generator=torch.Generator().manual_seed(3))

    model = _model(tiny_cfg, HR_LOSS_WEIGHT=0.0).eval()
    out = model.forward_train(x)
    torch.testing.assert_close(model.loss(out, y), seg_cross_entropy(out.logits, y))

    model = _model(tiny_cfg).eval()  # reference default: hr 0.1, lr 0
    out = model.forward_train(x)
    box = out.extras["detail_box"]
    expected = 0.9 * seg_cross_entropy(out.logits, y, weight) + 0.1 * seg_cross_entropy(
        out.extras["hr_logits"], crop(y, box), crop(weight, box)
    )
    torch.testing.assert_close(model.loss(out, y, weight), expected)

    model = _model(tiny_cfg, LR_LOSS_WEIGHT=0.2).eval()
    out = model.forward_train(x)
    box, lr = out.extras["detail_box"], out.extras["lr_logits"]
    fused_and_hr = 0.7 * seg_cross_entropy(out.logits, y) + 0.1 * seg_cross_entropy(
        out.extras["hr_logits"], crop(y, box)
    )
    torch.testing.assert_close(model.loss(out, y), fused_and_hr + 0.2 * seg_cross_entropy(lr, y))
    model.lr_loss_on_attended_logits = True  # the reference's quirk
    attended = (1 - out.extras["attention"]) * lr
    torch.testing.assert_close(model.loss(out, y), fused_and_hr + 0.2 * seg_cross_entropy(attended, y))


def test_mic_lambda_on_the_fused_term_as_released(tiny_cfg):
    """C1: MIC scales ``masked_loss['decode.loss_seg']`` only (masking_consistency_module.py L142-143), which for
    HRDA is the fused term already scaled by 1 - lr_w - hr_w (hrda_head.py L271); ``decode.hr.loss_seg`` stays."""
    x, y = _images(), _labels()
    weight = torch.rand(2, H, W, generator=torch.Generator().manual_seed(3))
    model = _model(tiny_cfg).eval()  # hr 0.1, lr 0
    out = model.forward_train(x)
    box, lam = out.extras["detail_box"], 0.5
    losses = {  # HRDAHead.losses' dict, then MIC's rescaling
        "decode.loss_seg": 0.9 * seg_cross_entropy(out.logits, y, weight),
        "decode.hr.loss_seg": 0.1 * seg_cross_entropy(out.extras["hr_logits"], crop(y, box), crop(weight, box)),
    }
    losses["decode.loss_seg"] *= lam
    torch.testing.assert_close(model.loss(out, y, weight, fused_weight=lam), sum(losses.values()))
    whole = lam * model.loss(out, y, weight)  # the fix: lambda * L_MIC
    assert not torch.allclose(whole, sum(losses.values()))


# ---------------------------------------------------------------------- both heads: training, inference, checkpoint
@pytest.mark.parametrize("head,attention", [("DAFormerHead", "SegFormerHead"), ("DeepLabV2Head", "DeepLabV2Head")])
def test_train_step_reaches_every_part(tiny_cfg, head, attention):
    model = _model(tiny_cfg, head).train()
    assert type(model.scale_attention_head).__name__ == attention
    if head == "DAFormerHead":  # its own weights, ATTENTION_EMBED_DIM wide, 1x1 fusion instead of the ASPP
        assert model.scale_attention_head.classifier.in_channels == 16
    torch.manual_seed(3)
    out = model.forward_train(_images())
    y1, y2, x1, x2 = out.extras["detail_box"]
    assert (y2 - y1, x2 - x1) == (32, 64) and y1 % 8 == 0 and x1 % 8 == 0
    assert out.logits.shape == (2, 19, H // model.output_stride, W // model.output_stride)
    loss = model.loss(out, _labels())
    assert torch.isfinite(loss)
    loss.backward()
    for part in (model.backbone, model.head, model.scale_attention_head):
        grads = [p.grad.abs().sum() for p in part.parameters() if p.grad is not None]
        assert grads and sum(grads) > 0, type(part).__name__
    # The attention head's parameter names contain "head", so SOLVER.HEAD_LR_MULTIPLIER applies (as mmcv's rule).
    assert all("head" in n for n, _ in model.named_parameters() if not n.startswith("backbone."))


def test_single_attention_and_features_at_the_context_scale(tiny_cfg):
    model = _model(tiny_cfg, ATTENTION_CLASSWISE=False).eval()
    x = _images()
    with torch.no_grad():
        out = model.forward_train(x)
        assert out.extras["attention"].shape[1] == 1
        assert model.feature_scale == 0.5
        expected = model.extract_features(torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear"))
    for name, value in expected.items():
        torch.testing.assert_close(out.features[name], value)


def test_predict_slides_detail_windows_in_one_batch(tiny_cfg):
    model = _model(tiny_cfg, "DeepLabV2Head").eval()
    calls = []
    model.backbone.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    with torch.no_grad():
        logits = model.predict(_images())
    assert logits.shape == (2, 19, H, W)
    # context: the whole image at 0.5; detail: 3 x 3 half-overlapping 32x64 windows of both images, one call
    assert calls == [(2, 3, H // 2, W // 2), (18, 3, 32, 64)]


def test_predict_without_slide_or_with_a_crop_larger_than_the_image(tiny_cfg):
    x = _images()
    whole = _model(tiny_cfg, HR_SLIDE_INFERENCE=False).eval()
    clamped = _model(tiny_cfg, HR_CROP_SIZE=(512, 512)).eval()
    with torch.no_grad():
        torch.testing.assert_close(whole.predict(x), clamped.predict(x))  # same weights (seeded), one window
        out = clamped.forward_train(x)
    assert out.extras["detail_box"] == (0, H, 0, W)
    # Test-time slide mode calls predict per window (the reference's 1024x1024 / 512 test slide).
    with torch.no_grad():
        assert slide_inference(clamped, x[:1], (32, 64), (16, 32), 4).shape == (1, 19, H, W)


def test_checkpoint_round_trip(tiny_cfg, tmp_path):
    model = _model(tiny_cfg)
    model.forward_train(_images())  # move the BN statistics away from their initial values
    path = tmp_path / "hrda.pth"
    torch.save(model.state_dict(), path)
    assert any(k.startswith("scale_attention_head.") for k in model.state_dict())
    restored = _model(tiny_cfg)
    restored.load_state_dict(torch.load(path, weights_only=True))
    model.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.predict(_images()), restored.predict(_images()))


def test_bad_settings_fail_loudly(tiny_cfg):
    with pytest.raises(ValueError, match="detail scale"):
        _model(tiny_cfg, SCALES=(0.5, 0.75))
    with pytest.raises(ValueError, match="FEATURE_SCALE"):
        _model(tiny_cfg, FEATURE_SCALE=0.25)
    with pytest.raises(ValueError, match="CROP_COORD_DIVISIBLE"):
        _model(tiny_cfg, "DeepLabV2Head", CROP_COORD_DIVISIBLE=4)
    model = _model(tiny_cfg)
    with pytest.raises(ValueError, match="detail box"):
        model.forward_train(_images(), detail_box=(0, 32, 100, 164))
    with pytest.raises(ValueError, match="divisible"):
        model.predict(torch.zeros(1, 3, 62, 128))
