"""Backbones, heads, pretrained weights from local files, the Segmentor and inference."""

import os
import re

import pytest
import timm
import torch
from torch import nn

from uda_plugins.config import get_uda_cfg
from uda_plugins.d2 import BACKBONE_REGISTRY, ShapeSpec, build_model
from uda_plugins.modeling import Segmentor, slide_inference, whole_inference
from uda_plugins.modeling.backbones.timm_backbone import build_mit


def _cfg(**kv):
    cfg = get_uda_cfg()
    cfg.MODEL.DEVICE = "cpu"
    for k, v in kv.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


STAGES = ("res2", "res3", "res4", "res5")

SMALL_RESNET = dict(
    **{"MODEL.TIMM.ARCH": "resnet18", "MODEL.TIMM.CHANNELS": (16, 24, 32, 48), "MODEL.TIMM.LAYERS": (1, 1, 1, 1)}
)


def _backbone(cfg):
    return BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, ShapeSpec(channels=3))


def test_dilated_resnet_output_stride_8_and_deep_stem():
    bb = _backbone(_cfg(**SMALL_RESNET, **{"MODEL.TIMM.STEM": "deep"}))
    shapes = bb.output_shape()
    assert [shapes[f].stride for f in ("res2", "res3", "res4", "res5")] == [4, 8, 8, 8]
    assert [shapes[f].channels for f in ("res2", "res3", "res4", "res5")] == [16, 24, 32, 48]
    out = bb(torch.randn(2, 3, 64, 96))
    assert out["res5"].shape == (2, 48, 8, 12) and out["res2"].shape == (2, 16, 16, 24)
    assert any(n.startswith("model.conv1.3") for n, _ in bb.named_parameters())  # the three-conv v1c stem
    os16 = _backbone(_cfg(**SMALL_RESNET, **{"MODEL.TIMM.OUTPUT_STRIDE": 16}))
    assert os16.output_shape()["res5"].stride == 16


def test_multi_grid_dilates_the_last_stage_like_u2pl():
    cfg = _cfg(
        **{"MODEL.TIMM.ARCH": "resnet50", "MODEL.TIMM.CHANNELS": (16, 24, 32, 48), "MODEL.TIMM.LAYERS": (1, 1, 1, 3)},
        **{"MODEL.TIMM.MULTI_GRID": (1, 2, 4)},
    )
    bb = _backbone(cfg)
    assert [b.conv2.dilation for b in bb.model.layer4] == [(4, 4), (8, 8), (16, 16)]  # U2PL's ResNet-101 layer4
    assert bb(torch.randn(1, 3, 64, 96))["res5"].shape[-2:] == (8, 12)
    cfg.MODEL.TIMM.MULTI_GRID = (1, 2)
    with pytest.raises(ValueError, match="one factor per block"):
        _backbone(cfg)


def test_mit_backbone_strides_and_widths():
    bb = _backbone(_cfg(**{"MODEL.BACKBONE.NAME": "build_mit_backbone", "MODEL.TIMM.ARCH": "mit_b0"}))
    shapes = bb.output_shape()
    assert [shapes[f].stride for f in ("res2", "res3", "res4", "res5")] == [4, 8, 16, 32]
    assert [shapes[f].channels for f in ("res2", "res3", "res4", "res5")] == [32, 64, 160, 256]
    assert bb(torch.randn(1, 3, 64, 64))["res5"].shape == (1, 256, 2, 2)


@pytest.mark.parametrize(
    "head,stride", [("DeepLabV2Head", 8), ("SegFormerHead", 4), ("DAFormerHead", 4), ("DeepLabV3PlusHead", 4)]
)
def test_heads(head, stride):
    features = {"DeepLabV2Head": ["res5"], "DeepLabV3PlusHead": ["res2", "res5"]}.get(
        head, ["res2", "res3", "res4", "res5"]
    )
    cfg = _cfg(
        **SMALL_RESNET,
        **{
            "MODEL.SEM_SEG_HEAD.NAME": head,
            "MODEL.SEM_SEG_HEAD.IN_FEATURES": features,
            "MODEL.SEM_SEG_HEAD.EMBED_DIM": 32,
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 7,
        },
    )
    net = Segmentor(cfg)
    logits = net(net.normalize(torch.randint(0, 255, (2, 3, 64, 96))))
    assert logits.shape == (2, 7, 64 // stride, 96 // stride)


def test_daformer_head_structure():
    cfg = _cfg(
        **SMALL_RESNET,
        **{
            "MODEL.SEM_SEG_HEAD.NAME": "DAFormerHead",
            "MODEL.SEM_SEG_HEAD.IN_FEATURES": ["res2", "res3", "res4", "res5"],
        },
    )
    head = Segmentor(cfg).head
    # dilation 1 -> a 1x1 conv; 6, 12, 18 -> depthwise-separable 3x3 convs with that dilation
    assert head.fuse.branches[0][0].kernel_size == (1, 1)
    dw = head.fuse.branches[2][0][0]
    assert dw.groups == dw.in_channels and dw.dilation == (12, 12)
    assert head.fuse.bottleneck[0].kernel_size == (3, 3)


def _mmcv_kaiming_std(conv: nn.Conv2d) -> float:
    # mmcv 1.3.7 kaiming_init(mode='fan_out', nonlinearity='relu', distribution='normal') (cnn/utils/weight_init.py
    # L60-65): std = gain / sqrt(fan_out), gain sqrt(2), fan_out = out_channels x kernel area (torch's rule for a
    # conv weight (out, in / groups, kh, kw), which mmcv calls).
    kh, kw = conv.kernel_size
    return (2.0 / (conv.out_channels * kh * kw)) ** 0.5


def _spread_within(w: torch.Tensor, std: float) -> bool:
    # A sample std of n N(0, s^2) draws has relative standard error 1/sqrt(2n); 6 of those bound it on any CPU
    # and any seed (the draws are the generator's, not a summation order's). The smallest tensor here has 4864
    # entries: 6% either way, while PyTorch's default init is 5x to 13x off (the audit's A2).
    tolerance = 6 / (2 * w.numel()) ** 0.5
    return abs(w.std().item() / std - 1) < tolerance


@pytest.mark.parametrize("head_name", ["DAFormerHead", "SegFormerHead"])
def test_decode_heads_are_initialised_like_mmcv(head_name):
    """A2: at DAFormer's shapes (256 channels per level, dilations 1/6/12/18, 19 classes), every ConvModule conv is
    kaiming fan_out normal with bias 0, every norm 1/0, and the classifier N(0, 0.01) with bias 0, as mmcv 1.3.7
    and mmseg's BaseDecodeHead init them (conv_module.py L163-191, decode_head.py L72-73)."""
    from uda_plugins.modeling.heads.common import ConvNormAct

    torch.manual_seed(0)
    shapes = {f: ShapeSpec(channels=c, stride=s) for f, c, s in zip(STAGES, (64, 128, 320, 512), (4, 8, 16, 32))}
    cfg = _cfg(
        **{
            "MODEL.SEM_SEG_HEAD.NAME": head_name,
            "MODEL.SEM_SEG_HEAD.IN_FEATURES": list(STAGES),
            "MODEL.SEM_SEG_HEAD.EMBED_DIM": 256,
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 19,
        }
    )
    from uda_plugins.d2 import SEM_SEG_HEADS_REGISTRY

    head = SEM_SEG_HEADS_REGISTRY.get(head_name)(cfg, shapes)
    modules = [m for m in head.modules() if isinstance(m, ConvNormAct)]
    assert len(modules) == (1 if head_name == "SegFormerHead" else 1 + 2 * 3 + 1)
    for m in modules:
        conv, norm = m[0], m[1]
        assert _spread_within(conv.weight, _mmcv_kaiming_std(conv)), (conv, conv.weight.std())
        assert conv.bias is None  # a norm follows
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    assert _spread_within(head.classifier.weight, 0.01) and not head.classifier.bias.any()
    # The per-level embeddings (mmseg's MLP, an nn.Linear) keep torch's default: kaiming-uniform(a=sqrt(5)) on
    # fan_in, i.e. std 1/sqrt(3 fan_in).
    for embed in head.embed.values():
        assert _spread_within(embed.weight, (1 / (3 * embed.in_channels)) ** 0.5)


def test_hrda_attention_head_is_initialised_like_mmcv():
    """HRDAHead builds its scale attention from the decode head's config (hrda_head.py L51-62), so it gets the
    same init: its classifier (one output per class) N(0, 0.01) with bias 0."""
    from uda_plugins.modeling.hrda import build_scale_attention_head

    torch.manual_seed(0)
    shapes = {f: ShapeSpec(channels=c, stride=s) for f, c, s in zip(STAGES, (64, 128, 320, 512), (4, 8, 16, 32))}
    cfg = _cfg(
        **{
            "MODEL.SEM_SEG_HEAD.NAME": "DAFormerHead",
            "MODEL.SEM_SEG_HEAD.IN_FEATURES": list(STAGES),
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 19,
        }
    )
    attention = build_scale_attention_head(cfg, shapes)
    assert _spread_within(attention.classifier.weight, 0.01) and not attention.classifier.bias.any()
    fuse = attention.fuse[0]
    assert _spread_within(fuse.weight, _mmcv_kaiming_std(fuse))


def _u2pl_deeplabv3_plus_parameters(in_planes, num_classes, inner=256, dilations=(12, 24, 36)):
    # ILM-ASSL core/models/decoder.py dec_deeplabv3_plus + core/models/base.py ASPP, transcribed (BatchNorm).
    bn = nn.BatchNorm2d

    def seq(*m):
        return nn.Sequential(*m)

    aspp = [seq(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_planes, inner, 1, bias=False), bn(inner), nn.ReLU())]
    aspp += [seq(nn.Conv2d(in_planes, inner, 1, bias=False), bn(inner), nn.ReLU())]
    aspp += [
        seq(nn.Conv2d(in_planes, inner, 3, padding=d, dilation=d, bias=False), bn(inner), nn.ReLU()) for d in dilations
    ]
    out_planes = (len(dilations) + 2) * inner
    head = seq(nn.Conv2d(out_planes, 256, 3, padding=1, bias=False), bn(256), nn.ReLU(), nn.Dropout2d(0.1))
    low_conv = seq(nn.Conv2d(256, 256, 1), bn(256), nn.ReLU())

    def branch(out):
        return seq(
            nn.Conv2d(512, 256, 3, padding=1, bias=True),
            bn(256),
            nn.ReLU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(256, 256, 3, padding=1, bias=True),
            bn(256),
            nn.ReLU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(256, out, 1, bias=True),
        )

    modules = nn.ModuleList(aspp + [head, low_conv, branch(num_classes), branch(256)])
    biases_before_a_norm = 1 + 4  # low_conv and the four 3x3 convs of the two branches (ours have none)
    return sum(p.numel() for p in modules.parameters()) - biases_before_a_norm * 256


def test_deeplabv3plus_head_is_u2pl_decoder():
    cfg = _cfg(
        **{"MODEL.TIMM.ARCH": "resnet18", "MODEL.TIMM.CHANNELS": (256, 24, 32, 48), "MODEL.TIMM.LAYERS": (1, 1, 1, 1)},
        **{
            "MODEL.SEM_SEG_HEAD.NAME": "DeepLabV3PlusHead",
            "MODEL.SEM_SEG_HEAD.IN_FEATURES": ["res2", "res5"],
            "MODEL.SEM_SEG_HEAD.ASPP_DILATIONS": (12, 24, 36),
            "MODEL.SEM_SEG_HEAD.CONVS_DIM": 256,  # U2PL's hard-coded decoder width
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 19,
        },
    )
    net = Segmentor(cfg)
    assert sum(p.numel() for p in net.head.parameters()) == _u2pl_deeplabv3_plus_parameters(48, 19)
    features = net.extract_features(net.normalize(torch.randint(0, 255, (2, 3, 64, 96))))
    logits, representation = net.head.forward_with_representation(features)
    assert logits.shape == (2, 19, 16, 24) and representation.shape == (2, 256, 16, 24)
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 64  # a small decoder: every width, the representation's included
    head = Segmentor(cfg).head
    assert head.low_level[0].out_channels == 64 and head.classifier[0][0].in_channels == 128
    assert head.representation_dim == 64 and head.forward_with_representation(features)[1].shape[1] == 64
    with pytest.raises(ValueError, match="IN_FEATURES must name two"):
        cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
        Segmentor(cfg)


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


def _assert_loaded(backbone, reference_sd):
    own = backbone.model.state_dict()
    compared = 0
    for k, v in reference_sd.items():
        if k in own:
            assert torch.equal(own[k], v), k
            compared += 1
    assert compared > 10


def test_pretrained_resnet_from_timm_torchvision_and_mmseg_files(tmp_path):
    kwargs = dict(stem_type="deep", stem_width=32, channels=(16, 24, 32, 48), layers=(1, 1, 1, 1))
    reference = timm.create_model("resnet18", **kwargs).state_dict()  # timm == torchvision names (+ fc)
    cfg = _cfg(**SMALL_RESNET, **{"MODEL.TIMM.STEM": "deep"})
    cfg.MODEL.BACKBONE.PRETRAINED = _save(reference, tmp_path / "timm.pth")
    _assert_loaded(_backbone(cfg), reference)
    # mmseg / mmcv: {"state_dict": {"backbone.stem.0.weight": ...}} with the v1c stem as stem.0..stem.7
    stem = {
        "conv1.0": "stem.0",
        "conv1.1": "stem.1",
        "conv1.3": "stem.3",
        "conv1.4": "stem.4",
        "conv1.6": "stem.6",
        "bn1": "stem.7",
    }
    mm = {}
    for k, v in reference.items():
        prefix = next((p for p in stem if k.startswith(p + ".")), None)
        mm["backbone." + (stem[prefix] + k[len(prefix) :] if prefix else k)] = v
    cfg.MODEL.BACKBONE.PRETRAINED = _save({"meta": {}, "state_dict": mm}, tmp_path / "mmseg.pth")
    _assert_loaded(_backbone(cfg), reference)


def test_pretrained_mit_from_the_original_segformer_names(tmp_path):
    reference = build_mit("mit_b0").state_dict()

    def original_name(k):  # timm -> the MiT / PVTv2 release's names
        k = k.replace("patch_embed.", "patch_embed1.")
        k = re.sub(r"stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", k)
        k = re.sub(r"stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}.", k)
        k = re.sub(r"stages\.(\d)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}.", k)
        return k.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")

    original = {original_name(k): v for k, v in reference.items()}
    assert "block1.0.attn.q.weight" in original and "patch_embed2.proj.weight" in original
    cfg = _cfg(
        **{
            "MODEL.BACKBONE.NAME": "build_mit_backbone",
            "MODEL.TIMM.ARCH": "mit_b0",
            "MODEL.BACKBONE.PRETRAINED": _save(original, tmp_path / "mit_b0.pth"),
        }
    )
    _assert_loaded(_backbone(cfg), reference)


def test_pretrained_file_errors(tmp_path):
    cfg = _cfg(**SMALL_RESNET, **{"MODEL.BACKBONE.PRETRAINED": str(tmp_path / "missing.pth")})
    with pytest.raises(FileNotFoundError, match="missing.pth' does not exist"):
        _backbone(cfg)
    cfg.MODEL.BACKBONE.PRETRAINED = _save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(KeyError, match="parameters are missing"):
        _backbone(cfg)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    cfg.MODEL.BACKBONE.PRETRAINED = str(tmp_path / "garbage.pth")
    with pytest.raises(OSError, match="could not be read"):
        _backbone(cfg)


def test_norm_options():
    frozen = _backbone(_cfg(**SMALL_RESNET, **{"MODEL.BACKBONE.NORM": "FrozenBN"}))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    gn = _backbone(_cfg(**SMALL_RESNET, **{"MODEL.BACKBONE.NORM": "GN"}))
    assert any(isinstance(m, nn.GroupNorm) for m in gn.modules())
    assert gn(torch.randn(1, 3, 32, 32))["res5"].shape[1] == 48


def test_source_only_meta_arch_contract(tiny_cfg):
    model = build_model(tiny_cfg)
    image = torch.randint(0, 255, (3, 48, 96), dtype=torch.uint8)
    label = torch.randint(0, 19, (48, 96))
    model.train()
    losses = model({"source": [{"image": image, "sem_seg": label}] * 2})
    assert set(losses) == {"loss_source"} and losses["loss_source"].requires_grad
    model.eval()
    out = model([{"image": image, "height": 60, "width": 120}])
    assert out[0]["sem_seg"].shape == (19, 60, 120)  # logits at the requested (original) size


def test_slide_inference_equals_whole_for_a_pointwise_net():
    net = nn.Conv2d(3, 5, 1)
    x = torch.randn(1, 3, 37, 53)
    whole = whole_inference(net, x)
    slide = slide_inference(net, x, crop=(16, 20), stride=(10, 13), windows_per_batch=3)
    assert torch.allclose(whole, slide, atol=1e-6)
    assert torch.allclose(slide_inference(net, x, crop=(64, 64), stride=(32, 32), windows_per_batch=2), whole)


def test_predicted_classes_equal_argmax_ties_included():
    from uda_plugins.modeling import predicted_classes

    scores = torch.randint(0, 3, (2, 5, 7, 9)).float()  # many ties: the first maximum wins, as argmax
    assert torch.equal(predicted_classes(scores), scores.argmax(1))
    assert torch.equal(predicted_classes(scores[0], dim=0), scores[0].argmax(0))


@pytest.mark.parametrize("num_classes", [1, 2, 19, 300])
def test_class_maximum_equals_max_with_its_indices(num_classes):
    from uda_plugins.modeling import class_maximum

    g = torch.Generator().manual_seed(num_classes)
    scores = torch.randint(0, 4, (3, num_classes, 6, 10), generator=g).float()  # ties everywhere
    for x, dim in [(scores, 1), (scores[0], 0), (torch.softmax(scores * 0.7, 1), 1), (scores.bfloat16(), 1)]:
        values, indices = class_maximum(x, dim)
        expected = x.max(dim=dim)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
        assert torch.equal(indices, x.float().argmax(dim))
    nan = scores.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert 0 <= int(class_maximum(nan)[1].max()) < num_classes  # a NaN maximum still names a class


def test_deeplabv2_dropout_drops_whole_channels_of_the_deepest_feature_before_the_classifier(tiny_cfg):
    # DUDA's DeepLabV2Decoder (models/decoders/deeplabv2_decoder.py:6-15): Dropout2d(0.5) on layer4, then the ASPP.
    from conftest import REPO

    from uda_plugins.modeling.heads.deeplabv2 import DeepLabV2Head

    tiny_cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
    tiny_cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.5
    head = DeepLabV2Head(tiny_cfg, {"res5": ShapeSpec(channels=64, stride=8)})
    x = torch.ones(2, 64, 6, 12)
    torch.manual_seed(0)
    dropped = head.dropout(x)
    per_channel = dropped.amax(dim=(2, 3))
    assert set(per_channel.unique().tolist()) == {0.0, 2.0}  # whole channels, kept ones scaled by 1 / (1 - p)
    assert torch.equal(dropped.amin(dim=(2, 3)), per_channel)
    torch.manual_seed(0)
    assert torch.equal(head({"res5": x}), sum(conv(dropped) for conv in head.aspp))
    head.eval()
    assert torch.equal(head({"res5": x}), sum(conv(x) for conv in head.aspp))
    for config, p in [("gta5_cityscapes/duda_dlv2_r101.yaml", 0.5), ("gta5_cityscapes/dacs_dlv2_r101.yaml", 0.0)]:
        cfg = get_uda_cfg()
        cfg.merge_from_file(os.path.join(REPO, "configs", config))
        assert cfg.MODEL.SEM_SEG_HEAD.DROPOUT == p, config
