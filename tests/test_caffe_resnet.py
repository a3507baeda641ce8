"""MODEL.TIMM.STYLE caffe is the DeepLab-V2 ResNet of DUDA and MCL: a transcription of parquets/DUDA
models/backbones/resnet.py (Bottleneck :62-114, ResNet :117-195; IBN left out, it is off in DUDA's configs) with the
same weights gives the same features, on the release's 65x65 grid for a 513x513 input; and
tools/convert_duda_checkpoint.py loads the authors' key naming so that their network's logits are ours."""

import os
import sys

import pytest
import torch
from conftest import REPO
from torch import nn

from uda_plugins.config import get_uda_cfg
from uda_plugins.d2 import BACKBONE_REGISTRY, ShapeSpec


def _conv1x1(i, o, stride=1):
    return nn.Conv2d(i, o, kernel_size=1, stride=stride, bias=False)


class _Bottleneck(nn.Module):  # resnet.py:62-114
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes, stride=stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class _ReleasedResNet(nn.Module):  # resnet.py:117-195, DeepLab-V2's strides (1, 2, 1, 1) and dilations (1, 1, 2, 4)
    def __init__(self, layers, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._make_layer(p, n, s, d) for p, n, s, d in zip((64, 128, 256, 512), layers, strides, dilations)
        )

    def _make_layer(self, planes, blocks, stride, dilation):
        downsample = nn.Sequential(_conv1x1(self.inplanes, planes * 4, stride), nn.BatchNorm2d(planes * 4))
        layers = [_Bottleneck(self.inplanes, planes, stride, downsample, dilation)]
        self.inplanes = planes * 4
        layers += [_Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name, layer in zip(("res2", "res3", "res4", "res5"), (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = out[name] = layer(x)
        return out


def _cfg(layers):
    cfg = get_uda_cfg()
    cfg.MODEL.TIMM.ARCH, cfg.MODEL.TIMM.LAYERS, cfg.MODEL.TIMM.STYLE = "resnet50", layers, "caffe"
    cfg.MODEL.TIMM.STEM, cfg.MODEL.TIMM.OUTPUT_STRIDE = "", 8
    return cfg


def _randomise_statistics(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_caffe_style_equals_the_released_resnet(tmp_path):
    layers = (2, 1, 2, 2)  # more than one block where the release dilates the first block too
    ours = BACKBONE_REGISTRY.get("build_dilated_resnet_backbone")(_cfg(layers), ShapeSpec(channels=3)).eval()
    theirs = _ReleasedResNet(layers).eval()
    _randomise_statistics(ours)
    missing, unexpected = theirs.load_state_dict(ours.model.state_dict(), strict=False)
    assert not missing and not unexpected  # the same names: torchvision's, timm's and the release's
    x = torch.randn(1, 3, 129, 129, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    for name in ("res2", "res3", "res4", "res5"):
        assert a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4, msg=name)
    # The release's feature grids at output stride 8: 65x65 for 513x513, and for MCL's 320x640 images 41x81 (the
    # ceil-mode max-pool: 160 -> 81), where timm's and torchvision's ResNet give 40x80.
    cfg = _cfg(layers)
    cfg.MODEL.TIMM.STYLE = "pytorch"
    plain = BACKBONE_REGISTRY.get("build_dilated_resnet_backbone")(cfg, ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        assert ours(torch.zeros(1, 3, 513, 513))["res5"].shape[-2:] == (65, 65)
        assert ours(torch.zeros(1, 3, 320, 640))["res5"].shape[-2:] == (41, 81)
        assert plain(torch.zeros(1, 3, 320, 640))["res5"].shape[-2:] == (40, 80)


def test_the_authors_checkpoint_names_convert_to_ours(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_duda_checkpoint

    from uda_plugins.engine import UDATrainer
    from uda_plugins.engine.checkpoint import load_evaluated_weights

    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "gta5_cityscapes", "duda_dlv2_r101.yaml"))
    cfg.MODEL.DEVICE, cfg.MODEL.TIMM.LAYERS, cfg.MODEL.BACKBONE.NORM = "cpu", (1, 1, 2, 1), "BN"
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    model = UDATrainer.build_model(cfg).eval()
    # The release's GeneralSegmentor: backbone + decoder.aspp.conv2d_list (ASPP_V2), saved from a DDP or
    # AveragedModel wrapper ("module." prefix, n_averaged).
    backbone = _ReleasedResNet((1, 1, 2, 1))
    _randomise_statistics(backbone)
    aspp = nn.ModuleList(nn.Conv2d(2048, 19, 3, padding=d, dilation=d) for d in (6, 12, 18, 24))
    state = {f"module.backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"module.decoder.aspp.conv2d_list.{k}": v for k, v in aspp.state_dict().items()})
    state["n_averaged"] = torch.tensor(7)
    authors, converted = str(tmp_path / "duda.pth"), str(tmp_path / "converted.pth")
    torch.save(state, authors)
    assert convert_duda_checkpoint.main([authors, converted]) == 0
    load_evaluated_weights(model, converted, "student")  # every student tensor, with its shape
    x = torch.randn(1, 3, 97, 97, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = backbone.eval()(x)["res5"]
        expected = sum(conv(features) for conv in aspp)
        torch.testing.assert_close(model.student(x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit):
        convert_duda_checkpoint.main([])
