"""Custom datasets without code: an image folder, a label folder and a class list, registered from a config file,
trained and evaluated on, and counted by the rare-class statistics tool."""

import json
import os
import sys

import numpy as np
import pytest
from conftest import REPO, tiny_overrides

sys.path.insert(0, os.path.join(REPO, "tools"))
import compute_class_stats  # noqa: E402
import train_net  # noqa: E402

from uda_plugins.data.datasets.image_folder import load_class_list, register_datasets_file  # noqa: E402


def test_class_lists_in_every_form_and_their_errors(tmp_path):
    assert load_class_list(["a", "b"]).classes == ("a", "b")
    (tmp_path / "c.json").write_text(json.dumps({"classes": ["x", "y"], "colors": [[1, 2, 3], [4, 5, 6]]}))
    assert load_class_list(str(tmp_path / "c.json")).colors == ((1, 2, 3), (4, 5, 6))
    with pytest.raises(ValueError, match="twice"):
        load_class_list(["a", "a"])
    with pytest.raises(ValueError, match="colour of 'b'"):
        load_class_list([{"name": "a"}, {"name": "b", "color": [1, 2]}])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_class_list(str(tmp_path / "nope.yaml"))


def test_register_train_evaluate_and_count_classes_from_a_config(custom, tmp_path):
    from uda_plugins.d2 import DatasetCatalog, MetadataCatalog

    assert register_datasets_file(str(custom / "datasets.json")) == ["mine_train", "mine_target", "mine_val"]
    register_datasets_file(str(custom / "datasets.json"))  # the same again: a no-op
    dicts = DatasetCatalog.get("mine_train")
    jpg = [d for d in dicts if d["file_name"].endswith("site1/frame1.jpg")]
    assert len(dicts) == 6 and len(jpg) == 1 and jpg[0]["sem_seg_file_name"].endswith("train/site1/frame1_label.png")
    assert "sem_seg_file_name" not in DatasetCatalog.get("mine_target")[0]
    assert MetadataCatalog.get("mine_val").stuff_classes == ["ground", "wall", "grass"]

    out = str(tmp_path / "out")
    overrides = tiny_overrides(
        out,
        **{
            "DATASETS.REGISTER": f"('{custom / 'datasets.json'}',)",
            "DATASETS.SOURCE_TRAIN": "('mine_train',)",
            "DATASETS.TARGET_TRAIN": "('mine_target',)",
            "DATASETS.TEST": "('mine_val',)",
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 3,
            "SOLVER.MAX_ITER": 30,
            "TEST.EVAL_PERIOD": 0,
        },
    )
    config = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")
    assert train_net.cli(["--config-file", config] + overrides) == 0
    with open(os.path.join(out, "inference", "mine_val", "sem_seg_evaluation.json")) as f:
        metrics = json.load(f)["metrics"]
    assert {"IoU-ground", "IoU-wall", "IoU-grass"} <= set(metrics) and metrics["mIoU"] > 30

    # The rare-class statistics tool on the same config: pixels per class of every source image.
    stats_dir = str(tmp_path / "stats")
    assert compute_class_stats.main(["--config-file", config, "--stats-dir", stats_dir] + overrides) == 0
    (cache,) = os.listdir(stats_dir)
    assert cache.startswith("class_stats.mine_train")
    with open(os.path.join(stats_dir, cache)) as f:
        pixels = np.asarray(json.load(f)["pixels"]).reshape(6, 3)
    # every image: 64 ignored pixels in row 0; wall columns 20..39 above row 24; grass rows 24..31
    assert pixels.tolist() == [[23 * 44, 23 * 20, 8 * 64]] * 6


def test_a_missing_label_fails_naming_both_files(custom, tmp_path):
    os.remove(custom / "labels" / "val" / "site0" / "frame2_label.png")
    spec = json.loads((custom / "datasets.json").read_text())
    (custom / "other.json").write_text(json.dumps({"mine_val_broken": spec["mine_val"]}))
    from uda_plugins.d2 import DatasetCatalog

    register_datasets_file(str(custom / "other.json"))
    with pytest.raises(FileNotFoundError, match="frame2.png' has no label file .*frame2_label.png"):
        DatasetCatalog.get("mine_val_broken")
