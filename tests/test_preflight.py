"""Bad input fails before a model or a loader is built, in one line naming the culprit."""

import os
import sys
import time

from conftest import REPO, tiny_overrides

sys.path.insert(0, os.path.join(REPO, "tools"))
import train_net  # noqa: E402

from uda_plugins.engine.preflight import config_writing  # noqa: E402

SOURCE_ONLY = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")


def _one_line(capsys) -> str:
    # (Loggers that earlier runs in this process set up may also print to a closed capture: not the tool's output.)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train_net.py: error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_a_misspelt_test_set_fails_before_training(tmp_path, capsys):
    out = str(tmp_path / "run")
    start = time.monotonic()
    code = train_net.cli(
        ["--config-file", SOURCE_ONLY] + tiny_overrides(out, **{"DATASETS.TEST": "('synthetic_tiny_target_vall',)"})
    )
    assert code == 1 and time.monotonic() - start < 10
    line = _one_line(capsys)
    assert "DATASETS.TEST names 'synthetic_tiny_target_vall', which is not a registered dataset" in line
    assert "did you mean 'synthetic_tiny_target_val'" in line
    assert not os.path.exists(os.path.join(out, "metrics.json"))  # not one iteration


def test_every_dataset_key_is_checked(tmp_path, capsys):
    for key in ("DATASETS.SOURCE_TRAIN", "DATASETS.TARGET_TRAIN"):
        overrides = tiny_overrides(str(tmp_path / key), **{key: "('gta_train',)"})
        assert train_net.cli(["--config-file", SOURCE_ONLY] + overrides) == 1
        assert f"{key} names 'gta_train'" in _one_line(capsys)


def test_an_unreadable_test_set_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UDA_DATASETS", str(tmp_path / "no_datasets"))
    overrides = tiny_overrides(str(tmp_path / "run"), **{"DATASETS.TEST": "('cityscapes_val',)"})
    assert train_net.cli(["--config-file", SOURCE_ONLY] + overrides) == 1
    line = _one_line(capsys)
    assert "cityscapes" in line and "does not exist" in line
    assert not os.path.exists(os.path.join(str(tmp_path / "run"), "metrics.json"))


def test_a_second_stage_without_its_first_says_which_config_writes_the_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative OUTPUT_DIRs: nothing trained here
    config = os.path.join(REPO, "configs", "multi_target", "mcl_gta5_to_cs_map_idd_7cls.yaml")
    assert train_net.cli(["--config-file", config, "MODEL.DEVICE", "cpu"]) == 1
    line = _one_line(capsys)
    warmup = "configs/multi_target/mcl_warmup_gta5_to_cs_map_idd_7cls.yaml"
    assert "MODEL.WEIGHTS 'output/multi_target/mcl_warmup_gta5_to_cs_map_idd_7cls/model_final.pth'" in line
    assert f"it is written by {os.path.join(REPO, warmup)}" in line  # absolute: the configs are not below the cwd
    # Every shipped second stage names its first.
    for name in os.listdir(os.path.join(REPO, "configs", "multi_target")):
        if name.startswith("mcl_") and not name.startswith("mcl_warmup"):
            weights = f"output/multi_target/{name.replace('mcl_', 'mcl_warmup_')[:-5]}/model_final.pth"
            writer = config_writing(weights, os.path.join(REPO, "configs", "multi_target", name))
            assert writer and writer.endswith(name.replace("mcl_", "mcl_warmup_")), name


def test_weights_of_no_known_config(tmp_path, capsys):
    overrides = tiny_overrides(str(tmp_path / "run"), **{"MODEL.WEIGHTS": str(tmp_path / "missing.pth")})
    assert train_net.cli(["--config-file", SOURCE_ONLY, "--eval-only"] + overrides) == 1
    assert f"MODEL.WEIGHTS file '{tmp_path / 'missing.pth'}' does not exist" in _one_line(capsys)


def test_a_gpu_config_on_a_machine_without_one_runs_on_the_cpu_in_bfloat16(monkeypatch):
    import torch

    from uda_plugins.config import get_uda_cfg
    from uda_plugins.engine.setup import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "gta5_cityscapes", "duda_dlv2_r101.yaml"))  # cuda, float16 AMP
    warning = resolve_device(cfg)
    assert cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.PRECISION == "bfloat16"
    assert "running on the CPU, with SOLVER.AMP.PRECISION bfloat16" in warning
    cfg = get_uda_cfg()
    cfg.MODEL.DEVICE, cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.PRECISION = "cpu", True, "float16"
    assert resolve_device(cfg) == "" and cfg.SOLVER.AMP.PRECISION == "float16"  # asked for on the CPU: the step refuses
