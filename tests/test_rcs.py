"""DAFormer rare-class sampling: class probabilities, image draws, crop re-draws, the class-statistics cache and
its tool, the source stream as a function of (seed, position), and a short training run with RCS on."""

import json
import logging
import os
import sys
import uuid

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_overrides
from PIL import Image

from uda_plugins.d2 import DatasetCatalog, MetadataCatalog
from uda_plugins.data import class_stats
from uda_plugins.data.build import DataRequirements, build_uda_train_loader
from uda_plugins.data.class_stats import StaleCache, ensure_class_stats, label_files, load_class_stats
from uda_plugins.data.datasets.common import read_label
from uda_plugins.data.mapper import UDADatasetMapper
from uda_plugins.data.samplers import RareClassSampler, rcs_class_probs
from uda_plugins.data.transforms import Geometry, apply_geometry, sample_geometry

sys.path.insert(0, os.path.join(REPO, "tools"))
import compute_class_stats  # noqa: E402
import train_net  # noqa: E402


# ------------------------------------------------------------------------------------------------ probabilities
def _reference_probs(counts, temperature):
    """lhoyer/MIC uda_dataset.calculate_frequencies, verbatim in torch (float32), on the classes that occur."""
    freq = torch.tensor([float(n) for n in counts if n > 0])
    freq = freq / torch.sum(freq)
    return torch.softmax((1 - freq) / temperature, dim=-1).numpy()


@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
def test_class_probs_follow_the_reference_formula(temperature):
    counts = [600_000, 250_000, 0, 100_000, 40_000, 9_000, 1_000]
    classes, probs = rcs_class_probs(counts, temperature)
    assert classes.tolist() == [0, 1, 3, 4, 5, 6]  # a class without pixels is never drawn
    f = np.array([600_000, 250_000, 100_000, 40_000, 9_000, 1_000]) / 1_000_000
    expected = np.exp((1 - f) / temperature) / np.exp((1 - f) / temperature).sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    np.testing.assert_allclose(probs, _reference_probs(counts, temperature), rtol=1e-4, atol=1e-7)
    assert np.all(np.diff(probs) > 0)  # rarer = more likely
    with pytest.raises(ValueError, match="temperature"):
        rcs_class_probs(counts, 0.0)


def _pixels(num_images=60, num_classes=5, seed=0):
    """Per-image class pixel counts with a frequent, a mid and rare classes; class 4 never above 3000."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((num_images, num_classes), dtype=np.int64)
    pixels[:, 0] = rng.integers(50_000, 80_000, num_images)
    pixels[:, 1] = rng.integers(0, 30_000, num_images)
    pixels[rng.random(num_images) < 0.3, 2] = rng.integers(2_000, 9_000)
    pixels[rng.random(num_images) < 0.1, 3] = 5_000
    pixels[:3, 3] = [3_000, 3_001, 200]  # > min_pixels is strict, as in the reference
    pixels[:5, 4] = 2_500
    return pixels


def test_sampler_frequencies_match_the_probabilities_and_images_hold_the_class(caplog):
    pixels = _pixels()
    with caplog.at_level(logging.WARNING, logger="uda_plugins.data.samplers"):
        sampler = RareClassSampler(pixels, temperature=0.3, min_pixels=3000, class_names=list("abcde"))
    assert "e; these classes are not drawn" in caplog.text
    assert sampler.class_probs[4] == 0 and sampler.classes.tolist() == [0, 1, 2, 3]
    # The dropped class leaves the softmax over the other classes (f_c still over all pixels).
    classes, probs = rcs_class_probs(pixels.sum(0), 0.3)
    np.testing.assert_allclose(sampler.class_probs[:4], probs[:4] / probs[:4].sum())
    assert sampler.images_with_class(3).tolist() == sorted(set(np.flatnonzero(pixels[:, 3] == 5_000).tolist()) | {1})

    rng = np.random.default_rng(0)
    n = 20_000
    draws = [sampler.sample(rng) for _ in range(n)]
    observed = np.bincount([c for _, c in draws], minlength=5)
    expected = sampler.class_probs * n
    used = expected > 0
    chi2 = float((((observed - expected) ** 2)[used] / expected[used]).sum())
    df = int(used.sum()) - 1
    assert chi2 < df + 6 * np.sqrt(2 * df), (observed, expected)  # ~ p < 1e-4 under the null
    assert observed[4] == 0
    for index, c in draws:
        assert pixels[index, c] > 3000
    # Images are drawn uniformly among the eligible ones.
    images_of_2 = sampler.images_with_class(2)
    counts = np.bincount([i for i, c in draws if c == 2], minlength=len(pixels))[images_of_2]
    assert counts.min() > 0.5 * counts.mean()


def test_sampler_without_any_eligible_image_fails():
    with pytest.raises(ValueError, match="MIN_PIXELS"):
        RareClassSampler(np.full((3, 2), 10), 0.01, 3000)


# ------------------------------------------------------------------------------------------------ crop re-draws
def _corner_label():
    label = np.zeros((100, 200), dtype=np.uint8)
    label[:50, :50] = 7  # a class in one corner
    return label


def test_crop_redraw_puts_the_class_in_the_crop():
    label = _corner_label()
    kwargs = dict(resize=(100, 200), ratio_range=(1.0, 1.5), crop_size=(40, 40), flip_prob=0.5, label=label)
    n, hits, hits_plain = 300, 0, 0
    for seed in range(n):
        g = sample_geometry(np.random.default_rng(seed), label.shape, required_class=7, required_pixels=50, **kwargs)
        hits += int((apply_geometry(label, g, is_label=True) == 7).sum() > 50)
        plain = sample_geometry(np.random.default_rng(seed), label.shape, **kwargs)
        hits_plain += int((apply_geometry(label, plain, is_label=True) == 7).sum() > 50)
    # About 20% of plain draws hold the class; the first and up to 10 re-draws: 1 - 0.8^11 ~ 90%.
    p = hits_plain / n
    assert p < 0.3 and hits / n > 0.8
    assert abs(hits / n - (1 - (1 - p) ** 11)) < 0.08

    # A first draw that already holds the class is kept: same geometry as without the rule.
    big = np.full((100, 200), 7, dtype=np.uint8)
    for seed in range(5):
        with_rule = sample_geometry(
            np.random.default_rng(seed), big.shape, required_class=7, required_pixels=50, **{**kwargs, "label": big}
        )
        assert with_rule == sample_geometry(np.random.default_rng(seed), big.shape, **{**kwargs, "label": big})
    # No re-draw budget or no label: one draw, as without the rule.
    g0 = sample_geometry(np.random.default_rng(3), label.shape, required_class=7, max_redraws=0, **kwargs)
    assert g0 == sample_geometry(np.random.default_rng(3), label.shape, **kwargs)


def test_mapper_redraws_for_the_required_class_even_without_returning_labels(tiny_cfg, tmp_path):
    image_file, label_file = str(tmp_path / "img.png"), str(tmp_path / "lab.png")
    Image.fromarray(np.zeros((100, 200, 3), dtype=np.uint8)).save(image_file)
    Image.fromarray(_corner_label()).save(label_file)
    d = {"file_name": image_file, "sem_seg_file_name": label_file, "height": 100, "width": 200}
    tiny_cfg.INPUT.SOURCE.CROP_SIZE = (40, 40)
    tiny_cfg.DATALOADER.RCS.MIN_PIXELS = 100
    tiny_cfg.DATALOADER.RCS.MIN_CROP_RATIO = 0.5
    for load_label in (True, False):
        mapper = UDADatasetMapper.from_config(tiny_cfg, "source", load_label=load_label)
        assert mapper.class_crop_pixels == 50 and mapper.class_crop_redraws == 10
        hits = 0
        for seed in range(30):
            out = mapper(d, rng=np.random.default_rng(seed), required_class=7)
            assert ("sem_seg" in out) == load_label
            crop = apply_geometry(_corner_label(), Geometry.from_dict(out["geometry"]), is_label=True)
            hits += int((crop == 7).sum() > 50)
        assert hits >= 20


# ------------------------------------------------------------------------------------------------ statistics cache
def _make_dataset(root, num_images=6, size=(24, 32)):
    """A labelled dataset on disk: root/images/i.png, root/labels/i_labelTrainIds.png (class 0 everywhere, class 1
    in the top 2*i rows, class 2 in image 0 only, ignore in the last row)."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    dicts = []
    for i in range(num_images):
        label = np.zeros(size, dtype=np.uint8)
        label[: 2 * i] = 1
        label[-1] = 255
        if i == 0:
            label[5:10, 5:10] = 2
        image_file = os.path.join(root, "images", f"{i:03d}.png")
        label_file = os.path.join(root, "labels", f"{i:03d}_labelTrainIds.png")
        Image.fromarray(np.zeros((*size, 3), dtype=np.uint8)).save(image_file)
        Image.fromarray(label).save(label_file)
        dicts.append({"file_name": image_file, "sem_seg_file_name": label_file, "height": size[0], "width": size[1]})
    return dicts


def _register(dicts, num_classes=4):
    name = f"rcs_test_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
    MetadataCatalog.get(name).set(stuff_classes=[f"class{c}" for c in range(num_classes)], ignore_label=255)
    return name


def test_stats_tool_writes_the_cache_beside_the_dataset_and_reuses_it(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "ds")
    dicts = _make_dataset(root)
    name = _register(dicts)
    assert compute_class_stats.main(["--dataset", name, "--jobs", "2", "--min-pixels", "10"]) == 0
    cache = os.path.join(root, f"class_stats.{name}.json")  # beside labels/, as the reference's data root
    assert os.path.isfile(cache)
    assert not [f for f in os.listdir(root) if f.endswith(".tmp")]  # written through a temp file
    with open(cache) as f:
        payload = json.load(f)
    assert payload["num_classes"] == 4 and payload["files"][0] == "000_labelTrainIds.png"
    pixels = np.array(payload["pixels"])
    for i, d in enumerate(dicts):  # counts at the stored resolution, ignore not counted
        label = read_label(d["sem_seg_file_name"])
        assert pixels[i].tolist() == [int((label == c).sum()) for c in range(4)]
    out = capsys.readouterr().out
    assert f"class statistics of 6 images in {cache}" in out and "class2" in out

    def no_compute(*args, **kwargs):
        raise AssertionError("a valid cache must be reused")

    monkeypatch.setattr(class_stats, "compute_class_pixels", no_compute)
    mtime = os.stat(cache).st_mtime_ns
    assert compute_class_stats.main(["--dataset", name]) == 0
    assert os.stat(cache).st_mtime_ns == mtime
    # The loader path reads the same cache, rows in the dataset's order whatever the order in the file.
    loaded, path = ensure_class_stats(name, dicts[::-1], 4)
    assert path == cache and loaded.tolist() == pixels[::-1].tolist()


def test_a_stale_cache_is_detected_and_recomputed(tmp_path, caplog):
    root = str(tmp_path / "ds")
    dicts = _make_dataset(root, num_images=4)
    pixels, cache = ensure_class_stats("stale_ds", dicts, 4, progress=False)
    more = _make_dataset(root, num_images=5)
    with pytest.raises(StaleCache, match="4 label files, the dataset 5"):
        load_class_stats(cache, "stale_ds", label_files(more), 4)
    with pytest.raises(StaleCache, match="4 classes, not 5"):
        load_class_stats(cache, "stale_ds", label_files(dicts), 5)
    with pytest.raises(StaleCache, match="dataset 'stale_ds'"):
        load_class_stats(cache, "other_name", label_files(dicts), 4)
    renamed = [dict(d, sem_seg_file_name=d["sem_seg_file_name"].replace("003_", "004_")) for d in dicts]
    with pytest.raises(StaleCache, match="1 not in the cache"):
        load_class_stats(cache, "stale_ds", label_files(renamed), 4)
    with caplog.at_level(logging.WARNING, logger="uda_plugins.data.class_stats"):
        recomputed, path = ensure_class_stats("stale_ds", more, 4, progress=False)
    assert "stale" in caplog.text and path == cache and recomputed.shape == (5, 4)
    assert load_class_stats(cache, "stale_ds", label_files(more), 4).tolist() == recomputed.tolist()


def test_stats_fall_back_to_the_user_cache_and_fail_loudly_on_bad_labels(tmp_path, monkeypatch):
    root = str(tmp_path / "ds")
    dicts = _make_dataset(root, num_images=2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(class_stats, "_writable", lambda path: not path.startswith(root))  # a read-only dataset
    _, path = ensure_class_stats("ro_ds", dicts, 4, progress=False)
    assert path.startswith(str(tmp_path / "xdg" / "uda_plugins" / "class_stats"))
    assert ensure_class_stats("ro_ds", dicts, 4, progress=False)[1] == path
    _, path = ensure_class_stats("ro_ds", dicts, 4, stats_dir=str(tmp_path / "mine"), progress=False)
    assert path.startswith(str(tmp_path / "mine"))
    # A label value that is no class: the file is named, nothing is cached.
    with pytest.raises(ValueError, match="000_labelTrainIds.png.*not classes 0..1"):
        ensure_class_stats("ro_ds2", dicts, 2, progress=False)
    assert compute_class_stats.main(["--dataset", "no_such_dataset"]) == 1


# ------------------------------------------------------------------------------------------------ the source stream
def _rcs_cfg(cfg, tmp_path):
    cfg.DATALOADER.RCS.ENABLED = True
    cfg.DATALOADER.RCS.MIN_PIXELS = 40  # the tiny images have 48x96 pixels
    cfg.DATALOADER.RCS.STATS_DIR = str(tmp_path / "stats")
    return cfg


def _source(batch):
    return [(d["file_name"], d["rcs_class"], d["geometry"]["crop"]) for d in batch["source"]]


def test_rcs_stream_is_a_function_of_seed_and_position(tiny_cfg, tmp_path, caplog):
    cfg = _rcs_cfg(tiny_cfg, tmp_path)
    with caplog.at_level(logging.INFO, logger="uda_plugins.data.build"):
        loader = build_uda_train_loader(cfg, DataRequirements(), seed=5)
    assert "Rare-class sampling of the source" in caplog.text and "P=" in caplog.text
    assert loader.dataset.source.rare_class_sampler is not None
    assert loader.dataset.targets[0].rare_class_sampler is None  # targets stay uniform
    it = iter(loader)
    batches = [next(it) for _ in range(6)]
    label_of = {d["file_name"]: d["sem_seg_file_name"] for d in DatasetCatalog.get("synthetic_tiny_source_train")}
    drawn = set()
    for b in batches:
        for d in b["source"]:
            c = d["rcs_class"]
            drawn.add(c)
            assert (read_label(label_of[d["file_name"]]) == c).sum() > 40
            assert (d["sem_seg"] == c).sum() > 40  # no crop in this config: the whole label
    assert len(drawn) > 2
    # Another loader with data workers, and a restart at iteration 4: the same samples.
    cfg.DATALOADER.NUM_WORKERS = 2
    again = iter(build_uda_train_loader(cfg, DataRequirements(), seed=5))
    for b in batches[:3]:
        other = next(again)
        assert _source(other) == _source(b)
        assert torch.equal(other["source"][1]["image"], b["source"][1]["image"])
    cfg.DATALOADER.NUM_WORKERS = 0
    restarted = build_uda_train_loader(cfg, DataRequirements(), seed=5)
    restarted.set_start_iter(4)
    assert _source(next(iter(restarted))) == _source(batches[4])
    other_seed = iter(build_uda_train_loader(cfg, DataRequirements(), seed=6))
    assert [_source(next(other_seed)) for _ in range(3)] != [_source(b) for b in batches[:3]]


def test_training_with_rare_class_sampling(tmp_path):
    out = str(tmp_path / "out")
    overrides = {
        "DATALOADER.RCS.ENABLED": True,
        "DATALOADER.RCS.MIN_PIXELS": 40,
        "INPUT.SOURCE.CROP_SIZE": "(32, 32)",
        "SOLVER.MAX_ITER": 2,
        "TEST.EVAL_PERIOD": 0,
        "VIS_PERIOD": 0,
        "DATASETS.TEST": "()",
    }
    config = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")
    assert train_net.cli(["--config-file", config] + tiny_overrides(out, **overrides)) == 0
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert "Rare-class sampling of the source" in log and "Class statistics of 'synthetic_tiny_source_train'" in log
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
