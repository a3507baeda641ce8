"""INPUT.FORMAT is honoured on every path that feeds a network: with a BGR config, the first channel the network
sees is blue in training (source, target, mixed), evaluation, tools/predict.py (and the Python Predictor), the
pseudo-label tool, the active-learning selection tool and the benchmark. Images travel as RGB everywhere else
(augmentation, pictures, padding), and Segmentor.normalize is the one place that converts."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_overrides
from PIL import Image

sys.path.insert(0, os.path.join(REPO, "tools"))
import active_learning_round  # noqa: E402
import benchmark  # noqa: E402
import generate_pseudo_labels  # noqa: E402
import predict  # noqa: E402
import train_net  # noqa: E402

from uda_plugins.modeling.segmentor import Segmentor  # noqa: E402

SOURCE_ONLY = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")
DACS = os.path.join(REPO, "configs", "synthetic", "dacs.yaml")


@pytest.fixture(scope="module")
def blue(tmp_path_factory):
    """Images whose left half is pure blue (RGB 0, 0, 255) and right half black, two classes, registered."""
    root = tmp_path_factory.mktemp("blue")
    for split in ("train", "val"):
        for i in range(4):
            (root / "images" / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            image = np.zeros((48, 96, 3), np.uint8)
            image[:, :48, 2] = 255
            label = np.zeros((48, 96), np.uint8)
            label[:, 48:] = 1
            Image.fromarray(image).save(root / "images" / split / f"c{i % 2}" / f"f{i}.png")
            Image.fromarray(label).save(root / "labels" / split / f"c{i % 2}" / f"f{i}_l.png")
    spec = {
        f"blue_{split}": {
            "images": f"images/{split}",
            "labels": f"labels/{split}",
            "classes": ["blue", "black"],
            "label_suffix": "_l",
        }
        for split in ("train", "val")
    }
    (root / "datasets.json").write_text(json.dumps(spec))
    return root


def _bgr(blue, out, **extra):
    values = {
        "DATASETS.REGISTER": f"('{blue / 'datasets.json'}',)",
        "DATASETS.SOURCE_TRAIN": "('blue_train',)",
        "DATASETS.TARGET_TRAIN": "('blue_train',)",
        "DATASETS.TEST": "('blue_val',)",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 2,
        "INPUT.FORMAT": "BGR",
        "MODEL.PIXEL_MEAN": "[0.0, 0.0, 0.0]",
        "MODEL.PIXEL_STD": "[1.0, 1.0, 1.0]",
        "SOLVER.MAX_ITER": 2,
        "TEST.EVAL_PERIOD": 0,
        "VIS_PERIOD": 1,  # pictures de-normalise: they must come out as RGB
    }
    values.update(extra)
    return tiny_overrides(out, **values)


@pytest.fixture
def seen(monkeypatch):
    """The largest value of each channel of every network input, in order."""
    record = []
    original = Segmentor.extract_features

    def extract_features(self, x):
        record.append(x.detach().float().amax(dim=(0, 2, 3)).tolist())
        return original(self, x)

    monkeypatch.setattr(Segmentor, "extract_features", extract_features)
    return record


def _blue_first(record):
    assert record, "no network input was seen"
    for first, _, third in record:
        assert first > 200 and third < first / 2, record  # blue in channel 0, (almost) no red in channel 2


@pytest.fixture(scope="module")
def trained(blue, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bgr_model"))
    assert train_net.cli(["--config-file", SOURCE_ONLY] + _bgr(blue, out)) == 0
    return os.path.join(out, "model_final.pth")


def test_training_and_evaluation_feed_bgr(blue, tmp_path, seen):
    assert train_net.cli(["--config-file", SOURCE_ONLY] + _bgr(blue, str(tmp_path / "so"))) == 0  # source + test
    assert len(seen) >= 3
    _blue_first(seen)
    seen.clear()
    # DACS: the teacher on target images, the student on mixed and blurred ones (the colour jitter, which would turn
    # blue into magenta, is checked below to work on RGB).
    no_jitter = {"UDA.STRONG_AUG.COLOR_JITTER_SKIP_PROB": 1.0}
    assert train_net.cli(["--config-file", DACS] + _bgr(blue, str(tmp_path / "dacs"), **no_jitter)) == 0
    _blue_first(seen)


def test_prediction_and_the_tools_feed_bgr(blue, trained, tmp_path, seen):
    weights = ["MODEL.WEIGHTS", trained]
    image = str(blue / "images" / "val" / "c0" / "f0.png")
    args = ["--config-file", SOURCE_ONLY, "--input", image, "--output", str(tmp_path / "pred")]
    assert predict.main(args + _bgr(blue, str(tmp_path / "p")) + weights) == 0
    _blue_first(seen)
    seen.clear()
    args = ["--config-file", SOURCE_ONLY, "--output", str(tmp_path / "bank")]
    assert generate_pseudo_labels.main(args + _bgr(blue, str(tmp_path / "g")) + weights) == 0
    _blue_first(seen)
    seen.clear()
    args = ["--config-file", SOURCE_ONLY, "--num", "1", "--output", str(tmp_path / "round.txt"), "--network", "student"]
    overrides = _bgr(blue, str(tmp_path / "a"), **{"DATASETS.TARGET_LABELED_LIST": "random:1"})
    assert active_learning_round.main(args + overrides + weights) == 0
    _blue_first(seen)
    seen.clear()
    assert benchmark.main(["--config-file", SOURCE_ONLY, "--iters", "1", "--warmup", "0"] + _bgr(blue, "x")) == 0
    _blue_first(seen)


def test_the_conversion_and_its_inverse(blue):
    from uda_plugins.config import get_uda_cfg
    from uda_plugins.data.mapper import crop_pad_image
    from uda_plugins.data.strong_aug import apply_strong_aug, sample_strong_aug

    cfg = get_uda_cfg()
    cfg.merge_from_list(_bgr(blue, "x")[2:])  # without MODEL.DEVICE
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [104.0, 117.0, 123.0], [1.0, 1.0, 1.0]
    net = Segmentor(cfg)
    rgb = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1)
    x = net.normalize(rgb)
    assert x.flatten().tolist() == [30 - 104, 20 - 117, 10 - 123]  # B, G, R minus the BGR means
    assert torch.equal(net.denormalize(x), rgb)  # pictures and augmentation get RGB back
    # Padded pixels are 0 after normalisation: the BGR mean, written in RGB order.
    assert crop_pad_image(cfg, cfg.INPUT.SOURCE) == (123, 117, 104)
    # The colour jitter sees the same RGB image whichever order the network reads.
    mean, std = net.pixel_mean, net.pixel_std
    image = torch.rand(2, 3, 8, 8) * 255
    params = sample_strong_aug(2, 0.2, 0.0, blur=False, generator=torch.Generator().manual_seed(0))
    bgr_out = net.denormalize(apply_strong_aug(net.normalize(image), params, mean, std, bgr=True))
    rgb_out = apply_strong_aug(image, params, torch.zeros(3, 1, 1), torch.ones(3, 1, 1))
    assert torch.allclose(bgr_out, rgb_out, atol=1e-3)
