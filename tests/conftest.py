"""Shared test set-up: an isolated cache for the synthetic datasets, a tiny training config and a small dataset of
your own (3 classes, registered from a file)."""

import json
import os
import tempfile

import numpy as np
import pytest
from PIL import Image

# Before uda_plugins is imported anywhere (and inherited by processes the tests spawn): generate the synthetic
# datasets into a private folder, and keep runs on the CPU.
_CACHE = tempfile.mkdtemp(prefix="uda_plugins_test_cache_")
os.environ.setdefault("UDA_SYNTHETIC_ROOT", os.path.join(_CACHE, "synthetic"))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC_BASE = os.path.join(REPO, "configs", "synthetic", "Base-Synthetic.yaml")


def tiny_overrides(output_dir: str, **extra) -> list:
    """KEY VALUE overrides turning the synthetic base config into a seconds-long CPU run on the tiny pair."""
    values = {
        "MODEL.DEVICE": "cpu",
        "DATASETS.SOURCE_TRAIN": "('synthetic_tiny_source_train',)",
        "DATASETS.TARGET_TRAIN": "('synthetic_tiny_target_train',)",
        "DATASETS.TEST": "('synthetic_tiny_target_val',)",
        "SOLVER.IMS_PER_BATCH_SOURCE": 2,
        "SOLVER.IMS_PER_BATCH_TARGET": 2,
        "SOLVER.MAX_ITER": 4,
        "SOLVER.WARMUP_ITERS": 2,
        "SOLVER.CHECKPOINT_PERIOD": 2,
        "TEST.EVAL_PERIOD": 2,
        "VIS_PERIOD": 2,
        "OUTPUT_DIR": output_dir,
    }
    values.update(extra)
    out = []
    for k, v in values.items():
        out += [k, str(v)]
    return out


@pytest.fixture
def tiny_cfg(tmp_path):
    """A frozen-able config (not frozen) for the tiny synthetic pair, SourceOnly."""
    from uda_plugins.config import get_uda_cfg

    cfg = get_uda_cfg()
    cfg.merge_from_file(SYNTHETIC_BASE)
    cfg.merge_from_list(tiny_overrides(str(tmp_path / "out")))
    cfg.MODEL.META_ARCHITECTURE = "SourceOnly"
    return cfg


def _write_dataset(root, split, n, labelled=True):
    rng = np.random.default_rng(len(split))
    for i in range(n):
        city = f"site{i % 2}"
        os.makedirs(root / "images" / split / city, exist_ok=True)
        image = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
        label = np.zeros((32, 64), np.uint8)
        label[:, 20:40] = 1
        label[24:, :] = 2
        label[0, :] = 255
        image[label == 1] = (200, 30, 30)  # learnable classes
        image[label == 2] = (30, 200, 30)
        Image.fromarray(image).save(
            root / "images" / split / city / f"frame{i}.jpg"
            if i % 2
            else root / "images" / split / city / f"frame{i}.png"
        )
        if labelled:
            os.makedirs(root / "labels" / split / city, exist_ok=True)
            Image.fromarray(label).save(root / "labels" / split / city / f"frame{i}_label.png")


@pytest.fixture
def custom(tmp_path):
    """A 3-class dataset of your own: images/labels folders, a class list and the DATASETS.REGISTER file."""
    root = tmp_path / "mine"
    _write_dataset(root, "train", 6)
    _write_dataset(root, "unlabelled", 4, labelled=False)
    _write_dataset(root, "val", 4)
    (root / "classes.yaml").write_text(
        "- {name: ground, color: [128, 64, 128]}\n- {name: wall}\n- {name: grass, color: [0, 200, 0]}\n"
    )
    spec = {
        "mine_train": {
            "images": "images/train",
            "labels": "labels/train",
            "classes": "classes.yaml",
            "label_suffix": "_label",
        },
        "mine_target": {"images": "images/unlabelled", "classes": "classes.yaml"},
        "mine_val": {
            "images": "images/val",
            "labels": "labels/val",
            "classes": "classes.yaml",
            "label_suffix": "_label",
        },
    }
    (root / "datasets.json").write_text(json.dumps(spec))
    yield root
    # Runs in this process register these names; the next test's folder is another one.
    from uda_plugins.d2 import DatasetCatalog, MetadataCatalog
    from uda_plugins.data.datasets import image_folder

    for name in spec:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        image_folder._registered.pop(name, None)
