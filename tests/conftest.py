"""Shared test set-up: an isolated cache for the synthetic datasets and a tiny training config."""

import os
import tempfile

import pytest

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
