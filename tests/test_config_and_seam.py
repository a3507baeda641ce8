"""The backend seam and the config: which backend, default parity with Detectron2, unknown keys, _BASE_."""

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import REPO, SYNTHETIC_BASE

from uda_plugins import d2
from uda_plugins.config import get_uda_cfg
from uda_plugins.d2.builtin.config import get_cfg as builtin_get_cfg
from uda_plugins.engine.setup import merge_overrides

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None


def _backend_in_subprocess(value):
    env = dict(os.environ, UDA_PLUGINS_BACKEND=value)
    return subprocess.run(
        [sys.executable, "-c", "import uda_plugins.d2 as d; print(d.BACKEND)"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def test_backend_is_detectron2_when_importable_unless_forced():
    forced = os.environ.get("UDA_PLUGINS_BACKEND")
    assert d2.BACKEND == (forced or ("detectron2" if HAS_DETECTRON2 else "builtin"))


def test_backend_can_be_forced_to_builtin():
    r = _backend_in_subprocess("builtin")
    assert r.returncode == 0 and r.stdout.strip() == "builtin"


def test_unknown_backend_fails():
    r = _backend_in_subprocess("caffe2")
    assert r.returncode != 0 and "UDA_PLUGINS_BACKEND must be 'builtin' or 'detectron2'" in r.stderr


@pytest.mark.skipif(HAS_DETECTRON2, reason="detectron2 is installed")
def test_forcing_a_missing_detectron2_fails_clearly():
    r = _backend_in_subprocess("detectron2")
    assert r.returncode != 0 and "detectron2 is not installed" in r.stderr


@pytest.mark.skipif(not HAS_DETECTRON2, reason="needs detectron2")
def test_builtin_defaults_equal_detectron2_defaults():
    from detectron2.config import get_cfg as d2_get_cfg

    ours, theirs = builtin_get_cfg(), d2_get_cfg()

    def walk(a, b, prefix=""):
        for k, v in a.items():
            assert k in b, f"{prefix}{k} is not a Detectron2 key"
            if isinstance(v, dict):
                walk(v, b[k], f"{prefix}{k}.")
            else:
                assert v == b[k], f"{prefix}{k}: builtin {v!r} != detectron2 {b[k]!r}"

    walk(ours, theirs)


def test_uda_config_merges_base_files_and_rejects_unknown_keys(tmp_path):
    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "synthetic", "source_only.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "SourceOnly"
    assert tuple(cfg.MODEL.TIMM.CHANNELS) == (32, 48, 96, 128)  # from the _BASE_ file
    assert cfg.DATASETS.TARGET_TRAIN == ("synthetic_target_train",)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{SYNTHETIC_BASE}"\nSOLVER:\n  BASE_LRR: 0.1\n')
    with pytest.raises(KeyError, match="Non-existent config key: SOLVER.BASE_LRR"):
        get_uda_cfg().merge_from_file(str(bad))
    with pytest.raises(KeyError, match="Non-existent config key: MODEL.FOO"):
        merge_overrides(get_uda_cfg(), ["MODEL.FOO", "1"])


def test_every_project_key_is_documented():
    """Every key add_uda_config sets has a comment on its line or in the comment block just above it."""
    import inspect

    from uda_plugins import config

    lines = inspect.getsource(config.add_uda_config).splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("_C.") and "=" in stripped and "CN()" not in stripped:
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("_C.") and "#" not in lines[j] and "CN()" not in lines[j]:
                j -= 1  # a group of keys under one comment
            if "#" not in line and not lines[j].strip().startswith("#") and "# " not in lines[j]:
                undocumented.append(stripped)
    assert not undocumented, undocumented


def _all_configs():
    import glob

    return sorted(
        p
        for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
        if not os.path.basename(p).startswith("Base-")
    )


@pytest.mark.parametrize("path", _all_configs(), ids=lambda p: os.path.relpath(p, os.path.join(REPO, "configs")))
def test_every_config_loads_and_names_registered_things(path):
    from uda_plugins.d2 import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, DatasetCatalog

    cfg = get_uda_cfg()
    cfg.merge_from_file(path)
    assert cfg.MODEL.META_ARCHITECTURE in META_ARCH_REGISTRY
    assert cfg.MODEL.BACKBONE.NAME in BACKBONE_REGISTRY and cfg.MODEL.SEM_SEG_HEAD.NAME in SEM_SEG_HEADS_REGISTRY
    for name in cfg.DATASETS.SOURCE_TRAIN + cfg.DATASETS.TARGET_TRAIN + cfg.DATASETS.TEST:
        assert name in DatasetCatalog.list(), name
    assert cfg.OUTPUT_DIR.startswith("output/")


def test_no_config_file_repeats_a_key():
    # A repeated top-level key (a second "MODEL:") makes YAML keep only the last block: a config that silently drops
    # its network settings. yacs does not catch it; this does, for every shipped config.
    import glob

    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [k.value for k, _ in node.value]
        repeated = {k for k in keys if keys.count(k) > 1}
        assert not repeated, f"{node.start_mark.name}: {sorted(repeated)} repeated"
        return loader.construct_mapping(node, deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    files = glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    assert len(files) > 50
    for path in files:
        with open(path) as f:
            yaml.load(f, StrictLoader)
