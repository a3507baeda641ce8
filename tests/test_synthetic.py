"""The embedded synthetic domain pair: deterministic, two different styles, written in the Cityscapes layout."""

import multiprocessing as mp
import os

import numpy as np

from uda_plugins.d2 import DatasetCatalog, MetadataCatalog
from uda_plugins.data.datasets.common import read_label
from uda_plugins.data.datasets.synthetic import (
    BUILDING,
    CAR,
    PERSON,
    TINY_SPEC,
    SyntheticPairSpec,
    ensure_synthetic_pair,
    present_classes,
    render_image,
)
from uda_plugins.data.labels import CITYSCAPES_19, cityscapes_labelid_to_trainid

DRAWN_IDS = {7, 8, 11, 17, 20, 21, 23, 24, 26}


def test_rendering_is_deterministic_and_uses_cityscapes_ids():
    a_img, a_lab = render_image(TINY_SPEC, "target", "train", 3)
    b_img, b_lab = render_image(TINY_SPEC, "target", "train", 3)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert a_img.shape == (48, 96, 3) and a_img.dtype == np.uint8
    assert set(np.unique(a_lab)) <= DRAWN_IDS
    other_img, _ = render_image(TINY_SPEC, "target", "train", 4)
    assert not np.array_equal(a_img, other_img)
    assert len(present_classes()) == 9


def test_the_two_domains_differ_in_appearance_and_class_frequencies():
    spec = SyntheticPairSpec(height=64, width=128)
    stats = {}
    for domain in ("source", "target"):
        car_person, sharpness, colours = [], [], []
        for i in range(40):
            img, lab = render_image(spec, domain, "train", i)
            car_person.append(np.isin(lab, [CAR, PERSON]).mean())
            sharpness.append(np.abs(np.diff(img.astype(float), axis=1)).mean())
            colours.append(img[lab == CAR].mean(0) if (lab == CAR).any() else np.full(3, np.nan))
        stats[domain] = (np.mean(car_person), np.nanstd(np.array(colours), axis=0).mean())
    # more cars and persons in the target, and cars of many colours (the source varies one colour per class)
    assert stats["target"][0] > 1.5 * stats["source"][0]
    assert stats["target"][1] > 2 * stats["source"][1]


def test_source_colour_variety_changes_colours_only():
    """Version 2 varies each source object's colour more (+-30 per channel, version 1: +-12); the scenes and the
    random draws stay the same, so ``source_color_jitter=12`` still renders version 1's images."""
    narrow, wide = (
        SyntheticPairSpec(height=64, width=128, source_color_jitter=12),
        SyntheticPairSpec(height=64, width=128),
    )
    assert wide.source_color_jitter == 30 and narrow.key() != wide.key()
    spread = {}
    for name, spec in (("narrow", narrow), ("wide", wide)):
        building_means = []
        for i in range(30):
            img, lab = render_image(spec, "source", "train", i)
            building_means.append(img[lab == BUILDING].mean(0))
        spread[name] = np.std(building_means, axis=0).mean()
    for i in range(5):
        assert np.array_equal(
            render_image(narrow, "source", "train", i)[1], render_image(wide, "source", "train", i)[1]
        )
        assert np.array_equal(
            render_image(narrow, "target", "train", i)[0], render_image(wide, "target", "train", i)[0]
        )
    assert spread["wide"] > 1.8 * spread["narrow"]


def test_files_are_in_the_cityscapes_layout_and_registered():
    names = [f"synthetic_tiny_{d}_{s}" for d in ("source", "target") for s in ("train", "val")]
    assert all(n in DatasetCatalog.list() for n in names)
    assert all(n.replace("_tiny", "_v1") in DatasetCatalog.list() for n in names)  # the version-1 pair
    dicts = DatasetCatalog.get("synthetic_tiny_target_val")
    assert len(dicts) == TINY_SPEC.num_target_val
    d = dicts[0]
    assert d["file_name"].endswith("_leftImg8bit.png") and "/leftImg8bit/val/" in d["file_name"]
    assert d["sem_seg_file_name"].endswith("_gtFine_labelTrainIds.png") and (d["height"], d["width"]) == (48, 96)
    raw = read_label(d["sem_seg_file_name"].replace("labelTrainIds", "labelIds"))
    train_ids = read_label(d["sem_seg_file_name"])
    assert np.array_equal(cityscapes_labelid_to_trainid()[raw], train_ids)  # converted by the real prep code
    assert MetadataCatalog.get("synthetic_tiny_target_val").stuff_classes == list(CITYSCAPES_19.classes)


def _ensure(root, spec, queue):
    queue.put(ensure_synthetic_pair(spec, root=root))


def test_concurrent_first_use_generates_once(tmp_path):
    spec = SyntheticPairSpec(
        height=16, width=32, num_source_train=3, num_source_val=1, num_target_train=3, num_target_val=1, seed=11
    )
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(str(tmp_path), spec, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    paths = {queue.get(timeout=5) for _ in procs}
    assert len(paths) == 1
    entries = [e for e in os.listdir(tmp_path) if not e.endswith(".lock")]
    assert entries == [spec.key()]  # no leftover temporary folders


def test_further_target_styles_for_multi_target_adaptation():
    spec = SyntheticPairSpec(height=64, width=128)
    brightness, contrast = {}, {}
    for domain in ("target", "target_dusk", "target_fog"):
        images = [render_image(spec, domain, "train", i)[0].astype(float) for i in range(12)]
        brightness[domain] = np.mean([im.mean() for im in images])
        contrast[domain] = np.mean([im.std() for im in images])
        # the scene of image i depends on its domain too: not a re-colouring of the target's image i
        assert not np.array_equal(
            render_image(spec, domain, "train", 0)[1], render_image(spec, "source", "train", 0)[1]
        )
    assert brightness["target_dusk"] < 0.75 * brightness["target"]  # dusk is dark
    assert contrast["target_fog"] < 0.8 * contrast["target"]  # fog flattens the image
    for style in ("dusk", "fog"):
        dicts = DatasetCatalog.get(f"synthetic_tiny_target_{style}_val")
        assert len(dicts) == TINY_SPEC.num_target_val and f"target_{style}" in dicts[0]["file_name"]
        assert MetadataCatalog.get(f"synthetic_tiny_target_{style}_train").stuff_classes == list(CITYSCAPES_19.classes)
