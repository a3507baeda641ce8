"""UDA.RELEASE_FIDELITY: every paper config of a method with listed quirks runs each of them as released; the
umbrella moves a config to our fixes (or back) as a whole, a command-line KEY VALUE still wins, and the resolved
config re-reads to the same run."""

import glob
import logging
import os

import pytest
from conftest import REPO

from uda_plugins.config import get_uda_cfg
from uda_plugins.engine.setup import load_cfg
from uda_plugins.release_fidelity import QUIRKS, _get, quirks_of

PAPER_FOLDERS = ("gta5_cityscapes", "synthia_cityscapes", "multi_target")


def _paper_configs(meta_architecture):
    paths = [p for f in PAPER_FOLDERS for p in glob.glob(os.path.join(REPO, "configs", f, "*.yaml"))]
    for path in sorted(p for p in paths if not os.path.basename(p).startswith("Base-")):  # not the partial bases
        cfg = get_uda_cfg()
        cfg.merge_from_file(path)
        if cfg.MODEL.META_ARCHITECTURE == meta_architecture:
            yield os.path.relpath(path, REPO), cfg


@pytest.mark.parametrize("method", sorted(QUIRKS))
def test_every_paper_config_runs_its_method_as_released(method):
    configs = list(_paper_configs(method))
    assert configs, f"no paper config of {method}"
    for path, cfg in configs:
        for quirk in quirks_of(method):
            assert _get(cfg, quirk.key) == quirk.released, (path, quirk.key)
        assert cfg.UDA.RELEASE_FIDELITY == ""


def test_each_quirk_is_a_config_key_with_two_distinct_values():
    cfg = get_uda_cfg()
    for method, quirks in QUIRKS.items():
        for quirk in quirks:
            default = _get(cfg, quirk.key)  # raises KeyError for a key that does not exist
            assert quirk.released != quirk.fixed and default in (quirk.released, quirk.fixed), (method, quirk.key)
            assert quirk.item and quirk.what


def test_the_umbrella_moves_a_paper_config_to_the_fixes_and_a_command_line_key_wins(tmp_path):
    config = os.path.join(REPO, "configs", "multi_target", "mcl_gta5_to_cs_idd_7cls.yaml")
    cfg, notes = load_cfg(config, ["UDA.RELEASE_FIDELITY", "fixed", "UDA.MCL.ENSEMBLE_ORDER", "own_first"])
    assert cfg.UDA.MCL.TARGET_LOSS_REDUCTION == "masked_mean" and cfg.UDA.MCL.COLOR_TRANSFER == "float"
    assert cfg.UDA.MCL.ENSEMBLE_ORDER == "own_first"  # pinned on the command line
    assert cfg.UDA.RELEASE_FIDELITY == ""  # resolved: config.yaml re-reads to the same run
    (line,) = [message for level, message in notes if level == logging.INFO]
    assert "UDA.MCL.TARGET_LOSS_REDUCTION: 'batch_broadcast' -> 'masked_mean' (M1" in line
    assert "ENSEMBLE_ORDER" not in line
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.dump())
    again, _ = load_cfg(str(saved))
    assert again.UDA.MCL == cfg.UDA.MCL

    # and back: a synthetic config (the library's defaults) as released
    synthetic = os.path.join(REPO, "configs", "synthetic", "duda.yaml")
    fixed, _ = load_cfg(synthetic, ["UDA.RELEASE_FIDELITY", "fixed"])
    released, _ = load_cfg(synthetic, ["UDA.RELEASE_FIDELITY", "as_released"])
    for quirk in quirks_of("DUDA"):
        assert _get(fixed, quirk.key) == quirk.fixed and _get(released, quirk.key) == quirk.released


def test_an_unknown_fidelity_names_the_key():
    config = os.path.join(REPO, "configs", "synthetic", "duda.yaml")
    with pytest.raises(ValueError, match="UDA.RELEASE_FIDELITY must be one of"):
        load_cfg(config, ["UDA.RELEASE_FIDELITY", "fix"])


def test_the_readme_lists_every_switch_with_both_values():
    readme = open(os.path.join(REPO, "README.md")).read()
    for method, quirks in QUIRKS.items():
        for quirk in quirks:
            row = f"| `{quirk.key}` | `{quirk.released}` | `{quirk.fixed}` |"
            lines = [line for line in readme.splitlines() if row in line]
            assert any(method in line.split("|")[1] for line in lines), (method, row)
