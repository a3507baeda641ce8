"""Guidance Training: the Guider's masking, its identity start, any feature size, the reference position
embedding, the weight formula (fixed, as the released code's aliasing computes it, and as the logged run's
commented-out code computes it, transcribed at the reference's shapes), the renamed switch, the multi-level warning,
the paper config's optimizer, loading a released checkpoint's Guider, gradients, and that the evaluated student
carries no Guider."""

import logging
import os

import numpy as np
import pytest
import torch
from conftest import REPO

from uda_plugins.methods.guidance import guidance_factor, view_target_fraction
from uda_plugins.modeling.guider import Guider, sincos_position_embedding
from uda_plugins.modeling.segmentor import View

CHANNELS = {"res2": 8, "res5": 16}


def _features(n=2, h=6, w=10):
    return {"res2": torch.randn(n, 8, 2 * h, 2 * w), "res5": torch.randn(n, 16, h, w)}


def _mask(n=2, h=24, w=40):
    m = torch.ones(n, 1, h, w)
    m[:, :, :, : w // 2] = 0  # the left half was pasted from the source
    return m


def _guider(**kw):
    return Guider(CHANNELS, "res5", embed_dim=32, depth=2, num_heads=4, patch_size=4, **kw)


def test_guider_starts_as_the_masked_features():
    torch.manual_seed(0)
    guider, feats, mask = _guider(), _features(), _mask()
    out = guider(feats, mask)
    m5 = torch.nn.functional.interpolate(mask, size=(6, 10), mode="nearest")
    torch.testing.assert_close(out["res5"], feats["res5"] * m5 + (1 - m5) * guider.projector_token)
    m2 = torch.nn.functional.interpolate(mask, size=(12, 20), mode="nearest")
    torch.testing.assert_close(out["res2"], feats["res2"] * m2 + (1 - m2) * guider.level_tokens["res2"])


def test_guider_never_sees_the_pasted_source_even_when_trained():
    torch.manual_seed(0)
    guider = _guider()
    with torch.no_grad():
        for p in guider.parameters():
            p.normal_()  # zero convs included: a "trained" Guider
    feats, mask = _features(), _mask()
    out = guider(feats, mask)
    changed = {k: v.clone() for k, v in feats.items()}
    changed["res5"][..., :5] += 100.0  # the source half of every level
    changed["res2"][..., :10] -= 100.0
    out2 = guider(changed, mask)
    for k in out:
        assert torch.equal(out[k], out2[k]), k
    assert not torch.equal(out["res5"][..., 5:], feats["res5"][..., 5:])  # the offset reaches the target part too


@pytest.mark.parametrize("size", [(6, 10), (5, 7), (64, 64)])
def test_guider_keeps_any_feature_size(size):
    guider = _guider()
    with torch.no_grad():
        guider.z2.weight.normal_()
    feats = {"res2": torch.randn(1, 8, 2 * size[0], 2 * size[1]), "res5": torch.randn(1, 16, *size)}
    out = guider(feats, _mask(1, 4 * size[0], 4 * size[1]))
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in feats.items()}


def _reference_pos_embed(embed_dim, grid_size):
    # MAE's get_2d_sincos_pos_embed as in Guidance-Training seg/mmseg/models/Guider.py (np.float -> np.float64).
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_position_embedding_matches_the_reference_on_square_grids():
    ours = sincos_position_embedding(512, 16, 16).numpy()
    np.testing.assert_allclose(ours, _reference_pos_embed(512, 16), atol=1e-6)
    assert sincos_position_embedding(64, 3, 5).shape == (15, 64)


def test_weight_formula_fixed_and_with_the_reference_aliasing(tiny_cfg):
    from uda_plugins.methods.guidance import GuidanceTraining
    from uda_plugins.modeling.segmentor import build_segmentor

    r = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(guidance_factor(r, 5.0), 1 - torch.exp(-5 * r))
    assert float(guidance_factor(torch.tensor(0.0), 5.0)) == 0.0

    tiny_cfg.UDA.GUIDANCE.LAMBDA = 1.0
    tiny_cfg.UDA.GUIDANCE.EMBED_DIM, tiny_cfg.UDA.GUIDANCE.NUM_HEADS = 32, 4
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :, :2] = 1  # image 0: 1/4 target in the whole image, 1/2 in the detail box (left 4 columns)
    mask[1] = 1
    views = [View({}, 1.0), View({}, 1.0, (0, 8, 0, 4))]
    assert view_target_fraction(mask, views[1]).tolist() == [0.5, 1.0]
    q = torch.full((2, 8, 8), 0.8)
    f_ctx, f_det = guidance_factor(torch.tensor([0.25, 1.0]), 5), guidance_factor(torch.tensor([0.5, 1.0]), 5)
    gt = GuidanceTraining(tiny_cfg, build_segmentor(tiny_cfg))
    w, mic = gt.weights(mask, views, q)
    torch.testing.assert_close(w[:, 0, 0], 0.8 * (f_ctx + f_det) / 2)
    assert torch.equal(mic, q)  # fixed: MIC keeps the pseudo-label weights
    gt.weighting = "as_released"
    w, mic = gt.weights(mask, views, q)
    torch.testing.assert_close(w[:, 0, 0], 0.8 * (f_ctx + f_ctx * f_det) / 2)
    torch.testing.assert_close(mic[:, 0, 0], 0.8 * f_ctx * f_det)
    w, mic = gt.weights(mask, views[:1], q)  # one view: q f for both
    torch.testing.assert_close(w[:, 0, 0], 0.8 * f_ctx)
    torch.testing.assert_close(mic, w)


# ----------------------------------------------------------------------------- G1 / G2: the weights, transcribed
def _reference_calibrated_pseudo_weight(pseudo_weight, mask):
    # Guidance-Training seg/mmseg/models/Guider.py:9-14, verbatim: in place, per image, on the float mask. The logged
    # code calls a function of this name from its older, unreleased `completor` module; HEAD's is the only body known.
    for i in range(mask.size(0)):
        ratio = torch.nonzero(mask[i]).size(0) / mask[i].numel()
        ratio = 1 - np.exp(-ratio * 5)
        pseudo_weight[i] = ratio * pseudo_weight[i]
    return pseudo_weight


def _reference_step_weights(q, mix_masks, scales, crop_box, logged):
    """(guidance weight, MIC weight) of one reference step: dacs.py:387-392 makes the pseudo-weight tensor, :418
    passes it to forward_train with mask = 1 - cat(mix_masks) (:420), :434 passes the same tensor to MIC."""
    pseudo_weight = q.clone()
    mask = 1 - torch.cat(mix_masks, dim=0)
    if logged:  # hrda_encoder_decoder.py:280-307: the scale loop transforms features only; one call after it (:298)
        guidance = _reference_calibrated_pseudo_weight(pseudo_weight, mask)
    else:  # hrda_encoder_decoder.py:251-278 (HEAD)
        guidance = torch.zeros_like(pseudo_weight)
        for i, s in enumerate(scales):
            scaled_mask = torch.nn.functional.interpolate(mask.float(), scale_factor=s, mode="nearest")  # mmseg resize
            if i >= 1:
                y1, y2, x1, x2 = crop_box
                scaled_mask = scaled_mask[:, :, y1:y2, x1:x2]
            guidance = guidance + _reference_calibrated_pseudo_weight(pseudo_weight, scaled_mask)
        guidance = guidance / len(scales)
    return guidance, pseudo_weight


def _reference_shaped_step():
    """The logged run's shapes (log: 1024x1024 crops, batch 2, HRDA scales [0.5, 1] sorted, a 512x512 detail crop
    at offsets divisible by 8): two ClassMix masks (1 = pasted from the source, (1, 1, H, W) each as get_class_masks
    returns them) and a pseudo-weight q (N, H, W) with the crop-margin zeros."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (2, 1, 32, 32), generator=g).repeat_interleave(32, 2).repeat_interleave(32, 3)
    masks = [(labels[0:1] < 4).float(), (labels[1:2] >= 3).float()]  # 32x32-pixel class regions, 2/3 and 1/2 source
    masks[0][..., 512:, 512:] = 1  # image 0: its detail crop below is all source -> f_det = 0
    q = torch.full((2, 1024, 1024), 0.9)
    q[:, :30], q[:, -30:], q[:, :, :30], q[:, :, -30:] = 0, 0, 0, 0  # crop_pseudo_margins [30, 240, 30, 30] style
    return masks, q, (512, 1024, 512, 1024)


@pytest.mark.parametrize("weighting", ["logged", "as_released"])
def test_weightings_match_the_reference_at_its_shapes(tiny_cfg, weighting):
    from uda_plugins.methods.guidance import GuidanceTraining
    from uda_plugins.modeling.segmentor import build_segmentor

    tiny_cfg.UDA.GUIDANCE.LAMBDA, tiny_cfg.UDA.GUIDANCE.WEIGHTING = 1.0, weighting
    tiny_cfg.UDA.GUIDANCE.EMBED_DIM, tiny_cfg.UDA.GUIDANCE.NUM_HEADS = 32, 4
    gt = GuidanceTraining(tiny_cfg, build_segmentor(tiny_cfg))
    masks, q, box = _reference_shaped_step()
    reference = _reference_step_weights(q, masks, [0.5, 1.0], box, logged=weighting == "logged")
    target_mask = (1 - torch.cat(masks)).float()  # what GuidanceTraining.forward makes of the (N, H, W) masks
    views = [View({}, 0.5), View({}, 1.0, box)]  # HRDA's context and detail views
    ours = gt.weights(target_mask, views, q)
    # Weights <= 1; the target fractions are exact in float32 (integer counts over 2^20 pixels), so the only
    # differences are float32's exp against float64's (a few ulps) and one product rounding: 1e-6 is far above
    # them and far below the differences between the weightings (> 0.02 here, checked below).
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert float(reference[1][0].max()) == 0.0 or weighting == "logged"  # HEAD: no target in image 0's detail crop
    gt.weighting = "mean"  # our fix differs from both by more than the tolerance
    fixed = gt.weights(target_mask, views, q)
    assert (fixed[0] - reference[0]).abs().max() > 0.02 and (fixed[1] - reference[1]).abs().max() > 0.02


def test_the_logged_weighting_is_one_factor_from_the_whole_image(tiny_cfg):
    from uda_plugins.methods.guidance import GuidanceTraining
    from uda_plugins.modeling.segmentor import build_segmentor

    tiny_cfg.UDA.GUIDANCE.LAMBDA, tiny_cfg.UDA.GUIDANCE.WEIGHTING = 1.0, "logged"
    tiny_cfg.UDA.GUIDANCE.EMBED_DIM, tiny_cfg.UDA.GUIDANCE.NUM_HEADS = 32, 4
    gt = GuidanceTraining(tiny_cfg, build_segmentor(tiny_cfg))
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :, :2] = 1  # 1/4 target in the whole image, 1/2 in the detail box, 1/4 at the context scale
    mask[1] = 1
    q = torch.full((2, 8, 8), 0.8)
    f_full = guidance_factor(torch.tensor([0.25, 1.0]), 5)
    for views in ([View({}, 1.0)], [View({}, 0.5), View({}, 1.0, (0, 8, 0, 4))]):  # the views do not matter
        w, mic = gt.weights(mask, views, q)
        torch.testing.assert_close(w[:, 0, 0], 0.8 * f_full)
        torch.testing.assert_close(mic, w)


def test_the_old_aliasing_key_names_its_replacement_and_a_bad_weighting_fails(tiny_cfg):
    from uda_plugins.engine.setup import merge_overrides
    from uda_plugins.methods.guidance import GuidanceTraining
    from uda_plugins.modeling.segmentor import build_segmentor

    with pytest.raises(KeyError, match="renamed to UDA.GUIDANCE.WEIGHTING.*True is WEIGHTING as_released"):
        merge_overrides(tiny_cfg.clone(), ["UDA.GUIDANCE.REFERENCE_WEIGHT_ALIASING", "True"])
    tiny_cfg.UDA.GUIDANCE.WEIGHTING = "aliased"
    with pytest.raises(ValueError, match="UDA.GUIDANCE.WEIGHTING must be one of"):
        GuidanceTraining(tiny_cfg, build_segmentor(tiny_cfg))


# ----------------------------------------------------------------------------- G4: multi-level heads warn
def test_a_multi_level_head_warns_once_at_build_and_deeplab_v2_does_not(tiny_cfg, caplog):
    from uda_plugins.methods.guidance import GuidanceTraining
    from uda_plugins.modeling.segmentor import build_segmentor

    tiny_cfg.UDA.GUIDANCE.LAMBDA = 1.0
    tiny_cfg.UDA.GUIDANCE.EMBED_DIM, tiny_cfg.UDA.GUIDANCE.NUM_HEADS = 32, 4
    logger = logging.getLogger("uda_plugins.methods.guidance")
    logger.addHandler(caplog.handler)  # whatever an earlier test's setup_logger did to propagation
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            GuidanceTraining(tiny_cfg, build_segmentor(tiny_cfg))  # the synthetic DAFormer head: res2..res5
            # Deduplicated: the record reaches caplog's handler directly and, where the logger propagates, via root.
            warnings = list({id(r): r for r in caplog.records if r.name == logger.name}.values())
            assert all(r.levelno == logging.WARNING for r in warnings)
            assert len(warnings) == 1 and "reads 4 feature levels (res2, res3, res4, res5)" in warnings[0].message
            assert "DAFormer-style heads lose accuracy" in warnings[0].message
            caplog.clear()
            tiny_cfg.MODEL.SEM_SEG_HEAD.NAME, tiny_cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = "DeepLabV2Head", ["res5"]
            GuidanceTraining(tiny_cfg, build_segmentor(tiny_cfg))
            assert not [r for r in caplog.records if r.name == logger.name]
    finally:
        logger.removeHandler(caplog.handler)


# ----------------------------------------------------------------------------- G5: the logged optimizer
def _paper_gt_model(config):
    """A GT model from a paper config, its network shrunk (the optimizer's rules depend on names and module types,
    not on widths)."""
    from uda_plugins.config import get_uda_cfg
    from uda_plugins.d2 import build_model

    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "gta5_cityscapes", config))
    small = {
        "MODEL.DEVICE": "cpu",
        "MODEL.BACKBONE.PRETRAINED": "",
        "MODEL.TIMM.ARCH": "resnet18",
        "MODEL.TIMM.STEM_WIDTH": "16",
        "MODEL.TIMM.CHANNELS": "[32, 48, 96, 128]",
        "MODEL.TIMM.LAYERS": "[1, 1, 1, 1]",
        "UDA.GUIDANCE.EMBED_DIM": "32",
        "UDA.GUIDANCE.NUM_HEADS": "4",
    }
    cfg.merge_from_list([x for kv in small.items() for x in kv])
    return cfg, build_model(cfg)


def _lr_and_decay(cfg, model):
    from uda_plugins.engine.optim import build_param_groups

    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in build_param_groups(cfg, model) for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def test_the_mic_hrda_gt_paper_config_decays_everything_like_the_logged_optimizer():
    # log:265-270 (experiments.py exp 81): AdamW, weight_decay 0.01, custom_keys {head: lr_mult 10} only.
    cfg, model = _paper_gt_model("mic_hrda_gt_dlv2_r101.yaml")
    groups = _lr_and_decay(cfg, model)
    guider = [n for n in groups if n.startswith("guidance.guider.")]
    tokens = [n for n in guider if n.endswith("_token")]
    norms = [n for n in guider if "norm" in n]
    assert len(tokens) == 2 and len(norms) == 10  # the two tokens; norm1/norm2 of 2 blocks and decoder_norm, w + b
    base = cfg.SOLVER.BASE_LR
    for name, (lr, wd) in groups.items():
        assert wd == 0.01, name
        assert lr == pytest.approx(base * (10.0 if "head" in name else 1.0)), name
    assert all(groups[n] == (base, 0.01) for n in tokens + norms)


def test_the_daformer_gt_paper_config_decays_the_guider_tokens_like_its_reference():
    # seg/configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_dlv2_s0.py:40-46: no "token" key.
    cfg, model = _paper_gt_model("daformer_gt_dlv2_r101.yaml")
    groups = _lr_and_decay(cfg, model)
    for name in ("guidance.guider.aggregation_token", "guidance.guider.projector_token"):
        assert groups[name] == (cfg.SOLVER.BASE_LR, 0.01), name


# ----------------------------------------------------------------------------- G8: a released checkpoint's Guider
def _reference_guider_shapes(c, d, p, depth=2, mlp=4):
    """The parameters of Guidance-Training seg/mmseg/models/Guider.py's Guider(cfg) for a head on c channels,
    embedding d, patch p, named as its modules are (Aggregation as `attn`, Projector as `projector`; timm's
    PatchEmbed.proj and Block)."""
    shapes = {
        "attn.mask_token": (1, c, 1, 1),  # :111
        "attn.patch_embed.proj.weight": (d, c, p, p),  # :115
        "attn.patch_embed.proj.bias": (d,),
        "attn.pos_embed": (1, 16, d),  # :122, requires_grad=False (a 4x4 grid here)
        "attn.z1.weight": (c, c, 1, 1),  # :128
        "attn.z1.bias": (c,),
        "projector.mask_token": (1, c, 1, 1),  # :62
        "projector.decoder_norm.weight": (d,),  # :65
        "projector.decoder_norm.bias": (d,),
        "projector.decoder_pred.weight": (p * p * c, d),  # :66
        "projector.decoder_pred.bias": (p * p * c,),
        "projector.z2.weight": (c, c, 1, 1),  # :71
        "projector.z2.bias": (c,),
    }
    for i in range(depth):  # :116-118
        b = f"attn.blocks.{i}"
        for name, shape in [
            ("norm1.weight", (d,)),
            ("norm1.bias", (d,)),
            ("attn.qkv.weight", (3 * d, d)),
            ("attn.qkv.bias", (3 * d,)),
            ("attn.proj.weight", (d, d)),
            ("attn.proj.bias", (d,)),
            ("norm2.weight", (d,)),
            ("norm2.bias", (d,)),
            ("mlp.fc1.weight", (mlp * d, d)),
            ("mlp.fc1.bias", (mlp * d,)),
            ("mlp.fc2.weight", (d, mlp * d)),
            ("mlp.fc2.bias", (d,)),
        ]:
            shapes[f"{b}.{name}"] = shape
    return shapes


def _completor_shapes(c, d, p):
    """The logged run's Completor as its module print names it (log:667-712: one `attn` holding patch_embed,
    blocks, decoder_norm, decoder_pred, conv1, conv2), plus a token whose name the print cannot show."""
    head = _reference_guider_shapes(c, d, p)
    shapes = {"attn." + k.split(".", 1)[1]: v for k, v in head.items() if "mask_token" not in k and "z" not in k}
    shapes.pop("attn.pos_embed")
    shapes.update({"attn.conv1.weight": (c, c, 1, 1), "attn.conv1.bias": (c,)})
    shapes.update({"attn.conv2.weight": (c, c, 1, 1), "attn.conv2.bias": (c,)})
    shapes["attn.mask_token"] = (1, c, 1, 1)  # a guess at an unprinted parameter: must not be loaded
    return shapes


def _guider_model(tiny_cfg):
    tiny_cfg.MODEL.SEM_SEG_HEAD.NAME, tiny_cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = "DeepLabV2Head", ["res5"]
    model = _dacs_gt(tiny_cfg)
    assert not model.guidance.guider.level_tokens  # one level, like the reference
    return model


def test_a_released_gt_checkpoint_fills_every_guider_parameter(tiny_cfg):
    from uda_plugins.modeling.mmseg_conversion import convert_mmseg_checkpoint

    model = _guider_model(tiny_cfg)
    c, d, p = model.guidance.guider.channels, 32, 2
    g = torch.Generator().manual_seed(0)
    source = {}
    for prefix in ("model.guider.", "ema_model.guider."):  # the reference's teacher carries an unused Guider
        source.update({prefix + k: torch.randn(s, generator=g) for k, s in _reference_guider_shapes(c, d, p).items()})
    state, unused = convert_mmseg_checkpoint({"meta": {}, "state_dict": source}, model)
    own = {k for k in model.state_dict() if k.startswith("guidance.guider.")}
    assert set(state) == own  # every Guider parameter filled, nothing else
    assert sorted(unused) == sorted([k for k in source if k.startswith("ema_model.")] + ["model.guider.attn.pos_embed"])
    renames = {"attn.mask_token": "aggregation_token", "projector.mask_token": "projector_token"}
    renames.update(
        {"attn.patch_embed.proj.weight": "patch_embed.weight", "attn.patch_embed.proj.bias": "patch_embed.bias"}
    )
    model.load_state_dict(state, strict=False)
    landed = dict(model.guidance.guider.named_parameters())
    for key, value in source.items():
        if not key.startswith("model.") or key.endswith("pos_embed"):
            continue
        name = key[len("model.guider.") :]
        ours = renames.get(name) or name.replace("attn.", "", 1).replace("projector.", "", 1)
        assert torch.equal(landed[ours], value), key
    wrong = dict(source)
    wrong["model.guider.projector.z2.weight"] = torch.zeros(2048, 2048, 1, 1)  # a ResNet-101 Guider
    with pytest.raises(ValueError, match="guidance.guider.z2.weight"):
        convert_mmseg_checkpoint({"state_dict": wrong}, model)


def test_the_logged_completor_loads_its_printed_layers(tiny_cfg):
    from uda_plugins.modeling.mmseg_conversion import convert_mmseg_checkpoint

    model = _guider_model(tiny_cfg)
    c = model.guidance.guider.channels
    g = torch.Generator().manual_seed(1)
    source = {"model.completor." + k: torch.randn(s, generator=g) for k, s in _completor_shapes(c, 32, 2).items()}
    state, unused = convert_mmseg_checkpoint({"state_dict": source}, model)
    assert unused == ["model.completor.attn.mask_token"]
    own = {k for k in model.state_dict() if k.startswith("guidance.guider.")}
    assert own - set(state) == {"guidance.guider.aggregation_token", "guidance.guider.projector_token"}
    assert torch.equal(state["guidance.guider.z1.weight"], source["model.completor.attn.conv1.weight"])
    assert torch.equal(state["guidance.guider.z2.bias"], source["model.completor.attn.conv2.bias"])
    assert torch.equal(state["guidance.guider.decoder_pred.weight"], source["model.completor.attn.decoder_pred.weight"])
    assert torch.equal(
        state["guidance.guider.blocks.1.mlp.fc1.weight"], source["model.completor.attn.blocks.1.mlp.fc1.weight"]
    )


def _dacs_gt(cfg, hrda=False):
    from uda_plugins.d2 import build_model

    cfg.MODEL.META_ARCHITECTURE = "DACS"
    cfg.UDA.GUIDANCE.LAMBDA = 1.0
    cfg.UDA.GUIDANCE.EMBED_DIM, cfg.UDA.GUIDANCE.NUM_HEADS, cfg.UDA.GUIDANCE.PATCH_SIZE = 32, 4, 2
    cfg.UDA.PSEUDO_LABEL.THRESHOLD = 0.0  # every pixel confident: guidance weights > 0 from the start
    if hrda:
        cfg.MODEL.HRDA.ENABLED = True
        cfg.MODEL.HRDA.HR_CROP_SIZE = (24, 48)
        cfg.MODEL.HRDA.ATTENTION_EMBED_DIM = 16
    model = build_model(cfg)
    model.init_teacher()
    model.train()
    return model


def _batch(cfg):
    from uda_plugins.data.build import DataRequirements, build_uda_train_loader

    return next(iter(build_uda_train_loader(cfg, DataRequirements(), seed=0)))


@pytest.mark.parametrize("hrda", [False, True])
def test_guidance_gradient_reaches_guider_head_and_encoder(tiny_cfg, hrda):
    from uda_plugins.d2 import EventStorage

    model = _dacs_gt(tiny_cfg, hrda)
    batch = _batch(tiny_cfg)

    def guidance_grads():
        model.zero_grad(set_to_none=True)
        with EventStorage(0):
            losses = model(batch)
        assert float(losses["loss_guidance"].detach()) > 0
        losses["loss_guidance"].backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    grads = guidance_grads()
    nonzero = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert "guidance.guider.z2.weight" in nonzero and "guidance.guider.projector_token" in nonzero
    assert any(n.startswith("student.head.") for n in nonzero)
    assert any(n.startswith("student.backbone.") for n in nonzero)
    assert not any(n.startswith("teacher.") for n in grads)
    # z2 starts at zero, so the transformer behind it learns from the second step on.
    assert "guidance.guider.z1.weight" not in nonzero
    with torch.no_grad():
        model.guidance.guider.z2.weight.normal_(std=0.02)
    nonzero = {n for n, g in guidance_grads().items() if g is not None and g.abs().sum() > 0}
    assert {"guidance.guider.z1.weight", "guidance.guider.blocks.0.attn.qkv.weight"} <= nonzero


def test_the_evaluated_student_has_no_guider(tiny_cfg):
    from uda_plugins.d2 import build_model

    plain_cfg = tiny_cfg.clone()
    plain_cfg.MODEL.META_ARCHITECTURE = "DACS"
    plain = build_model(plain_cfg)
    model = _dacs_gt(tiny_cfg)
    assert plain.student.state_dict().keys() == model.student.state_dict().keys()
    assert not any("guid" in k for k in model.teacher.state_dict())
    assert any(k.startswith("guidance.guider.") for k in model.state_dict())  # checkpointed for resume
    calls = []
    model.guidance.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():
        model.inference([{"image": torch.zeros(3, 48, 96), "height": 48, "width": 96}])
    assert not calls
