"""The config check at real shapes: the fabricated datasets (their raw layouts, resolutions and label formats) and
``tools/check_configs.py`` on one config of every method family and of every dataset, plus a config that mixes
sizes, which it must report."""

import importlib.util
import os
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from uda_plugins.data.datasets import cityscapes, gta5, idd, mapillary, synthia
from uda_plugins.data.datasets.fabricate import REAL_SIZES, fabricate_datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location("check_configs", os.path.join(REPO, "tools", "check_configs.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_configs"] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    folders = fabricate_datasets(root)
    gta5.prepare_gta5(folders["gta5"])
    cityscapes.prepare_cityscapes(folders["cityscapes"])
    synthia.prepare_synthia(folders["synthia"])
    idd.prepare_idd(folders["idd"])
    mapillary.prepare_mapillary(folders["mapillary"])
    return folders


def _sizes(dicts):
    return [(d["height"], d["width"]) for d in dicts]


def test_fabricated_datasets_have_the_real_layouts_sizes_and_label_formats(fabricated):
    f = fabricated
    splits = {
        ("gta5", "train"): gta5.load_gta5_semseg(f["gta5"]),
        ("synthia", "train"): synthia.load_synthia_semseg(f["synthia"]),
        **{("cityscapes", s): cityscapes.load_cityscapes_semseg(f["cityscapes"], s) for s in ("train", "val")},
        **{("idd", s): idd.load_idd_semseg(f["idd"], s) for s in ("train", "val")},
        **{("mapillary", s): mapillary.load_mapillary_semseg(f["mapillary"], s) for s in ("train", "val")},
    }
    for (name, split), dicts in splits.items():
        assert sorted(_sizes(dicts)) == sorted(REAL_SIZES[name][split]), (name, split)
        for d in dicts:
            label = np.asarray(Image.open(d["sem_seg_file_name"]))
            assert label.shape == (d["height"], d["width"])
            classes, counts = np.unique(label[label != 255], return_counts=True)
            # Every dataset's scene holds most classes, each over rare-class sampling's 3000 pixels.
            assert len(classes) >= 14 and counts.min() > 3000, (d["file_name"], classes, counts.min())
    # The raw formats: GTA5's and Mapillary's palette PNGs, SYNTHIA's 16-bit 3-channel labels, JPEG Mapillary images.
    with Image.open(os.path.join(f["gta5"], "labels", "00001.png")) as raw:
        assert raw.mode == "P"
    raw = cv2.imread(os.path.join(f["synthia"], "GT", "LABELS", "0000000.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape == (760, 1280, 3)
    assert splits["mapillary", "train"][0]["file_name"].endswith(".jpg")
    assert len(mapillary.read_mapillary_classes(os.path.join(f["mapillary"], "config.json"))) == 66
    # One GTA5 frame's raw label is taller than its image, as a few real ones are; the prepare step fitted it.
    last = f"{len(REAL_SIZES['gta5']['train']):05d}.png"
    with Image.open(os.path.join(f["gta5"], "labels", last)) as raw:
        assert raw.size == (1914, 1054)


# One config of every method family and of every dataset (GTA5, SYNTHIA, Cityscapes, IDD, Mapillary), each with its
# own data shapes: DAFormer (MiT, rare-class sampling, feature distance, 512 crops); QuadMix, whose first phase is
# MIC(HRDA) (1024 crops, detail windows, masks) and whose four-way mixing runs from the second iteration; Guidance
# Training on MIC(HRDA); DUDA on SYNTHIA (its stretch to 1820x1024; warm-up and initial bank chained); STAL (769
# crops padded; its lists converted); MCL's two stages on three targets with IDD's and Mapillary's aspect ratios.
# About 2 minutes on 2 cores (batches capped at 4); the README has the command for every config and its last full table.
CI_CONFIGS = [
    "configs/gta5_cityscapes/daformer_mitb5.yaml",
    "configs/gta5_cityscapes/mic_hrda_gt_dlv2_r101.yaml",
    "configs/gta5_cityscapes/quadmix_dlv2_r101.yaml",
    "configs/synthia_cityscapes/duda_dlv2_r101.yaml",
    "configs/synthia_cityscapes/stal_dlv3p_r101_1pct.yaml",
    "configs/multi_target/mcl_gta5_to_cs_map_idd_7cls.yaml",
]


def test_configs_of_every_method_and_dataset_train_at_real_shapes(tmp_path):
    # What the issue found: MCL keeping the aspect ratio mixes crop sizes; the check must report it, not pass.
    mixing = tmp_path / "configs" / "mcl_keep_ratio.yaml"
    mixing.parent.mkdir()
    base = os.path.join(REPO, "configs", "multi_target", "mcl_warmup_gta5_to_cs_map_idd_7cls.yaml")
    mixing.write_text(
        f'_BASE_: "{base}"\nINPUT:\n  TARGET:\n    RESIZE_MODE: "keep_ratio"\nOUTPUT_DIR: "output/mcl_keep_ratio"\n'
    )
    tool = _tool()
    configs = [os.path.join(REPO, c) for c in CI_CONFIGS] + [str(mixing)]
    # Batches of at most 4 images per stream: the shapes and a per-process batch that can mix sizes are kept (STAL's
    # 16 labelled crops of 769x769 were a third of the check).
    checks = tool.check_configs(configs, 2, str(tmp_path / "w"), max_batch=4)
    print(tool.table(checks))
    results = {c.config: c.result for c in checks}
    for config in CI_CONFIGS:
        assert results[config] == "pass", (config, results[config])
    failed = results[os.path.relpath(str(mixing), REPO)]
    assert failed.startswith("fail: train_net.py: error: The target1 stream cannot form batches of 4 images")
    assert "INPUT.TARGET.CROP_PAD is none" in failed


def test_the_batch_cap_keeps_smaller_batches_and_is_off_by_default():
    tool = _tool()
    from uda_plugins.engine.setup import load_cfg

    stal, _ = load_cfg(os.path.join(REPO, "configs/synthia_cityscapes/stal_dlv3p_r101_1pct.yaml"), [])
    assert tool.batch_cap_overrides(stal, 4) == {"SOLVER.IMS_PER_BATCH_SOURCE": 4, "SOLVER.IMS_PER_BATCH_TARGET": 4}
    assert tool.batch_cap_overrides(stal, 0) == {}
    daformer, _ = load_cfg(os.path.join(REPO, "configs/gta5_cityscapes/daformer_mitb5.yaml"), [])
    assert tool.batch_cap_overrides(daformer, 4) == {"SOLVER.IMS_PER_BATCH_SOURCE": 2, "SOLVER.IMS_PER_BATCH_TARGET": 2}
