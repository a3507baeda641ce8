"""Label tables, replayable transforms, the mapper and the UDA loader."""

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as cs_labels
from PIL import Image

from uda_plugins.data.build import DataRequirements, UDABatchDataset, build_uda_train_loader, get_dataset_dicts
from uda_plugins.data.datasets.cityscapes import load_cityscapes_semseg, prepare_cityscapes
from uda_plugins.data.labels import (
    CITYSCAPES_19,
    EVAL_SUBSETS,
    MTAF_7,
    UnknownLabelError,
    apply_lut,
    check_label_values,
    cityscapes_labelid_to_mtaf7,
    cityscapes_labelid_to_trainid,
)
from uda_plugins.data.mapper import UDADatasetMapper
from uda_plugins.data.samplers import EpochPermutationSampler, InferenceSampler, rank_positions
from uda_plugins.data.transforms import Geometry, apply_geometry, apply_geometry_tensor, fit_scale, sample_geometry


# ------------------------------------------------------------------------------------------------ labels
def test_cityscapes_trainid_table_is_cityscapesscripts():
    lut = cityscapes_labelid_to_trainid()
    for label in cs_labels:
        if label.id >= 0:
            assert lut[label.id] == (label.trainId if 0 <= label.trainId < 255 else 255), label.name
    assert CITYSCAPES_19.classes[0] == "road" and CITYSCAPES_19.classes[18] == "bicycle"
    assert CITYSCAPES_19.colors[13] == (0, 0, 142)


def test_mtaf7_table_and_synthia_subsets():
    lut = cityscapes_labelid_to_mtaf7()
    expect = {
        7: "flat",
        8: "flat",
        11: "construction",
        17: "object",
        21: "nature",
        22: "nature",
        23: "sky",
        25: "human",
        29: "vehicle",
        33: "vehicle",
        9: None,
        18: None,
        0: None,
    }
    for raw, name in expect.items():
        assert lut[raw] == (MTAF_7.index(name) if name else 255), raw
    assert len(EVAL_SUBSETS["synthia16"]) == 16 and len(EVAL_SUBSETS["synthia13"]) == 13
    assert CITYSCAPES_19.index("terrain") not in EVAL_SUBSETS["synthia16"]
    assert CITYSCAPES_19.index("wall") in EVAL_SUBSETS["synthia16"]
    assert CITYSCAPES_19.index("wall") not in EVAL_SUBSETS["synthia13"]


def test_apply_lut_rejects_values_outside_the_table():
    lut = cityscapes_labelid_to_trainid()
    out = apply_lut(np.array([[7, 8], [0, 33]], dtype=np.uint8), lut, "x.png")
    assert out.tolist() == [[0, 1], [255, 18]]
    with pytest.raises(UnknownLabelError, match=r"bad\.png: label values \[40\]"):
        apply_lut(np.array([[7, 40]], dtype=np.uint8), lut, "bad.png")
    with pytest.raises(UnknownLabelError, match="outside the class table"):
        apply_lut(np.array([[7, 300]], dtype=np.uint16), lut, "big.png")
    check_label_values(np.array([[0, 18, 255]], dtype=np.uint8), 19, "ok.png")
    with pytest.raises(UnknownLabelError, match=r"l\.png: label values \[19\]"):
        check_label_values(np.array([[0, 19]], dtype=np.uint8), 19, "l.png")


# ------------------------------------------------------------------------------------------------ transforms
def test_geometry_is_recorded_and_replayable():
    rng = np.random.default_rng(0)
    label = np.random.default_rng(1).integers(0, 19, (60, 100)).astype(np.uint8)
    geometry = sample_geometry(
        rng, label.shape, resize=(30, 60), ratio_range=(1.5, 2.0), crop_size=(32, 32), flip_prob=1.0
    )
    assert geometry.flip and geometry.output_size == (32, 32)
    assert Geometry.from_dict(geometry.to_dict()) == geometry
    numpy_out = apply_geometry(label, geometry, is_label=True)
    torch_out = apply_geometry_tensor(torch.from_numpy(label).long(), geometry, mode="nearest")
    assert numpy_out.shape == (32, 32)
    assert torch.equal(torch_out, torch.from_numpy(numpy_out).long())
    # A map at 1/4 of the image resolution (as logits are) lands on the same crop.
    quarter = torch.from_numpy(label[::4, ::4].astype(np.float32))
    assert apply_geometry_tensor(quarter, geometry).shape == (32, 32)


def test_image_replay_on_the_device_matches_the_worker():
    rng = np.random.default_rng(3)
    image = np.random.default_rng(4).integers(0, 256, (40, 80, 3)).astype(np.uint8)
    geometry = sample_geometry(rng, image.shape[:2], resize=(60, 120), crop_size=(24, 40), flip_prob=0.5)
    numpy_out = apply_geometry(image, geometry, is_label=False).astype(np.float32)
    torch_out = apply_geometry_tensor(torch.from_numpy(image).permute(2, 0, 1).float(), geometry)
    assert np.abs(torch_out.permute(1, 2, 0).numpy() - numpy_out).max() <= 2.0  # cv2 vs torch rounding


def test_fit_scale_and_category_max_ratio():
    assert fit_scale((1052, 1914), (720, 1280)) == pytest.approx(1280 / 1914)
    assert fit_scale((1024, 2048), (0, 0)) == 1.0
    label = np.zeros((64, 64), dtype=np.uint8)
    label[:, 56:] = 1  # class 1 only in a thin strip: most crops are all class 0
    for seed in range(20):
        g = sample_geometry(
            np.random.default_rng(seed), label.shape, crop_size=(16, 16), cat_max_ratio=0.75, label=label
        )
        crop = apply_geometry(label, g, is_label=True)
        counts = np.bincount(crop.ravel(), minlength=2)
        if counts.min() > 0:
            break
    else:
        pytest.fail("cat_max_ratio never accepted a mixed crop")


def _mmseg_random_crop(check, draw):
    """mmseg RandomCrop.__call__'s loop (lhoyer/MIC seg/mmseg/datasets/pipelines/transforms.py L548-559),
    transcribed: a first box, then up to 10 checks, each failed one redrawing; the last box is kept unchecked."""
    crop_bbox = draw()
    for _ in range(10):
        if check(crop_bbox):
            break
        crop_bbox = draw()
    return crop_bbox


@pytest.mark.parametrize("passes_at", [1, 3, None])
def test_category_max_ratio_redraws_as_mmseg(monkeypatch, passes_at):
    """C2: after 10 failed checks mmseg keeps an 11th, unchecked crop (we kept the 10th failed one)."""
    from uda_plugins.data import transforms

    label = np.zeros((64, 64), dtype=np.uint8)
    drawn = []
    real = transforms.GeometryRule._crop_box

    def recording(self, rng, rh, rw):
        drawn.append(real(self, rng, rh, rw))
        return drawn[-1]

    checks = []

    def ok(crop, ratio, ignore):
        checks.append(crop)
        return passes_at is not None and len(checks) == passes_at

    monkeypatch.setattr(transforms.GeometryRule, "_crop_box", recording)
    monkeypatch.setattr(transforms, "_crop_ok", ok)
    g = sample_geometry(np.random.default_rng(0), label.shape, crop_size=(16, 16), cat_max_ratio=0.75, label=label)
    ours = list(drawn)
    drawn.clear()
    checks.clear()
    rng = np.random.default_rng(0)
    rule = transforms.GeometryRule(crop_size=(16, 16), cat_max_ratio=0.75)
    rule.scaled_size(label.shape, rule.draw_factor(rng))
    release = _mmseg_random_crop(lambda box: ok(box, 0.75, 255), lambda: recording(rule, rng, 64, 64))
    assert len(ours) == len(drawn) == (passes_at or 11)
    assert tuple(g.crop) == tuple(release) == tuple(ours[-1])


# ------------------------------------------------------------------------------------------------ mapper
def _fake_cityscapes(root, n=2, size=(16, 32)):
    for split in ("train", "val"):
        for i in range(n):
            img_dir, gt_dir = root / "leftImg8bit" / split / "city", root / "gtFine" / split / "city"
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full(size + (3,), 40 * i, np.uint8)).save(
                img_dir / f"city_{i:06d}_000019_leftImg8bit.png"
            )
            ids = np.full(size, 7, np.uint8)
            ids[: size[0] // 2] = 23
            Image.fromarray(ids).save(gt_dir / f"city_{i:06d}_000019_gtFine_labelIds.png")
    prepare_cityscapes(str(root))
    return root


def _mapper(cfg, domain="source", load_label=True):
    return UDADatasetMapper.from_config(cfg, domain, load_label=load_label)


def test_mapper_output_contract(tiny_cfg, tmp_path):
    root = _fake_cityscapes(tmp_path / "cs")
    d = load_cityscapes_semseg(str(root), "train")[0]
    tiny_cfg.INPUT.SOURCE.CROP_SIZE = (8, 16)
    out = _mapper(tiny_cfg)(d, rng=np.random.default_rng(0))
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 8, 16)
    assert out["sem_seg"].dtype == torch.int64 and out["sem_seg"].shape == (8, 16)
    assert (out["height"], out["width"]) == (16, 32)
    assert set(out["sem_seg"].unique().tolist()) <= {0, 10}  # road, sky trainIds
    assert Geometry.from_dict(out["geometry"]).output_size == (8, 16)
    test_out = _mapper(tiny_cfg, "test")(d)
    assert test_out["sem_seg"].shape == (16, 32)  # evaluation labels stay at full size


def test_mapper_bad_inputs_fail_naming_the_file(tiny_cfg, tmp_path):
    root = _fake_cityscapes(tmp_path / "cs", n=1)
    d = load_cityscapes_semseg(str(root), "train")[0]
    mapper = _mapper(tiny_cfg)
    # label values outside the class table
    Image.fromarray(np.full((16, 32), 19, np.uint8)).save(d["sem_seg_file_name"])
    with pytest.raises(UnknownLabelError, match="labelTrainIds.png: label values \\[19\\]"):
        mapper(d)
    # label size differs from the image
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d["sem_seg_file_name"])
    with pytest.raises(ValueError, match="is 8x8 but its image .* is 16x32"):
        mapper(d)
    # image size differs from the dataset dict
    with pytest.raises(ValueError, match="is 16x32 but its dataset dict says 10x10"):
        mapper(dict(d, height=10, width=10))
    # corrupt image
    with open(d["file_name"], "wb") as f:
        f.write(b"\x89PNG not really")
    with pytest.raises(OSError, match="leftImg8bit.png' is corrupt"):
        mapper(d)


def test_dataset_errors_missing_root_split_and_label(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder '.*nowhere' does not exist.*UDA_DATASETS"):
        load_cityscapes_semseg(str(tmp_path / "nowhere"), "train")
    root = _fake_cityscapes(tmp_path / "cs", n=1)
    with pytest.raises(FileNotFoundError, match="leftImg8bit/test' does not exist"):
        load_cityscapes_semseg(str(root), "test")
    label = next((root / "gtFine" / "train" / "city").glob("*labelTrainIds.png"))
    label.unlink()
    with pytest.raises(FileNotFoundError, match="Image '.*leftImg8bit.png' has no label file '.*labelTrainIds.png'"):
        load_cityscapes_semseg(str(root), "train")


# ------------------------------------------------------------------------------------------------ sampling
def test_samplers():
    s = EpochPermutationSampler(5, seed=3)
    first_epoch = [s.index(p) for p in range(5)]
    assert sorted(first_epoch) == list(range(5))
    assert sorted(s.index(p) for p in range(5, 10)) == list(range(5))  # every epoch is a permutation
    assert [s.index(p) for p in range(5)] == first_epoch  # a function of the position only
    assert rank_positions(2, 4, 1, 2) == [9, 11]
    assert sorted(rank_positions(2, 4, 0, 2) + rank_positions(2, 4, 1, 2)) == rank_positions(2, 4, 0, 1)
    with pytest.raises(ValueError, match="cannot be split over 3 processes"):
        rank_positions(0, 4, 0, 3)
    shards = [list(InferenceSampler(10, r, 3)) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def _names(batch):
    return [d["file_name"] for d in batch["source"]], [[d["file_name"] for d in t] for t in batch["target"]]


def test_uda_loader_structure_and_requirements(tiny_cfg):
    loader = build_uda_train_loader(tiny_cfg, DataRequirements(target=True), seed=0)
    batch = next(iter(loader))
    assert len(batch["source"]) == 2 and len(batch["target"]) == 1 and len(batch["target"][0]) == 2
    assert "sem_seg" in batch["source"][0] and "sem_seg" not in batch["target"][0][0]
    assert "synthetic_tiny/" not in batch["source"][0]["file_name"]  # a real file path
    source_only = next(iter(build_uda_train_loader(tiny_cfg, DataRequirements(target=False), seed=0)))
    assert "target" not in source_only
    oracle = next(iter(build_uda_train_loader(tiny_cfg, DataRequirements(source=False, target_labels=True), seed=0)))
    assert "source" not in oracle and "sem_seg" in oracle["target"][0][0]


def test_uda_loader_is_the_same_with_workers_and_after_a_restart(tiny_cfg):
    reference = build_uda_train_loader(tiny_cfg, DataRequirements(), seed=7)
    it = iter(reference)
    batches = [next(it) for _ in range(5)]
    tiny_cfg.DATALOADER.NUM_WORKERS = 2
    with_workers = build_uda_train_loader(tiny_cfg, DataRequirements(), seed=7)
    it2 = iter(with_workers)
    for b in batches:
        other = next(it2)
        assert _names(other) == _names(b)
        assert torch.equal(other["source"][0]["image"], b["source"][0]["image"])  # same crop and flip too
    restarted = build_uda_train_loader(tiny_cfg, DataRequirements(), seed=7)
    restarted.set_start_iter(3)
    assert _names(next(iter(restarted))) == _names(batches[3])


def test_uda_loader_state_restores_a_drawn_seed(tiny_cfg):
    original = build_uda_train_loader(tiny_cfg, DataRequirements(), seed=123)
    resumed = build_uda_train_loader(tiny_cfg, DataRequirements(), seed=999)  # as if SEED -1 drew another seed
    assert _names(next(iter(resumed))) != _names(next(iter(original)))
    resumed.load_state_dict(original.state_dict())
    assert _names(next(iter(resumed))) == _names(next(iter(original)))


def test_uda_loader_splits_a_global_batch_over_ranks(tiny_cfg):
    tiny_cfg.SOLVER.IMS_PER_BATCH_SOURCE = 4
    one = build_uda_train_loader(tiny_cfg, DataRequirements(target=False), seed=1).dataset
    halves = []
    for rank in range(2):
        ds = build_uda_train_loader(tiny_cfg, DataRequirements(target=False), seed=1).dataset
        halves.append(UDABatchDataset(ds.source, [], rank, 2))
    for iteration in range(3):
        full = sorted(d["file_name"] for d in one.batch(iteration)["source"])
        split = sorted(d["file_name"] for h in halves for d in h.batch(iteration)["source"])
        assert split == full
        assert len(halves[0].batch(iteration)["source"]) == 2


def test_unknown_or_empty_dataset_names_fail():
    with pytest.raises(KeyError, match="Dataset 'nope' is not registered"):
        get_dataset_dicts(["nope"])
