"""Bad input through the command line: one clear line on stderr, exit status 1, nothing silently trained."""

import os
import sys

import torch
from conftest import REPO, tiny_overrides

from uda_plugins.d2 import META_ARCH_REGISTRY, get_event_storage
from uda_plugins.methods import SourceOnly

sys.path.insert(0, os.path.join(REPO, "tools"))
import train_net  # noqa: E402

SOURCE_ONLY = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")


def _run(capsys, args):
    code = train_net.cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_config_file_that_does_not_exist(capsys, tmp_path):
    code, err = _run(capsys, ["--config-file", str(tmp_path / "nope.yaml")])
    assert code == 1 and err == f"train_net.py: error: Config file '{tmp_path / 'nope.yaml'}' does not exist"


def test_unknown_config_key_in_a_file_and_on_the_command_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{SOURCE_ONLY}"\nSOLVER:\n  MAX_ITERS: 10\n')
    code, err = _run(capsys, ["--config-file", str(bad)])
    assert code == 1 and err == "train_net.py: error: Non-existent config key: SOLVER.MAX_ITERS"
    code, err = _run(capsys, ["--config-file", SOURCE_ONLY, "SOLVER.LRR", "1"])
    assert code == 1 and err == "train_net.py: error: Non-existent config key: SOLVER.LRR"


def test_missing_dataset_root(capsys, tmp_path):
    from uda_plugins.data.datasets import register_cityscapes

    register_cityscapes(str(tmp_path / "no_cityscapes_here"), name_prefix="errtest_cityscapes")
    args = ["--config-file", SOURCE_ONLY] + tiny_overrides(
        str(tmp_path / "out"), **{"DATASETS.SOURCE_TRAIN": "('errtest_cityscapes_train',)"}
    )
    code, err = _run(capsys, args)
    assert code == 1 and "does not exist" in err and "datasets/README.md" in err and "cityscapes" in err


@META_ARCH_REGISTRY.register()
class NaNAtIteration3(SourceOnly):
    """SourceOnly whose loss becomes NaN at iteration 3."""

    def forward_train(self, batch):
        losses = super().forward_train(batch)
        if get_event_storage().iter == 3:
            losses["loss_source"] = losses["loss_source"] * float("nan")
        return losses


def test_non_finite_loss_stops_names_the_loss_and_keeps_the_last_good_checkpoint(capsys, tmp_path):
    out = tmp_path / "nan"
    args = ["--config-file", SOURCE_ONLY] + tiny_overrides(
        str(out), **{"MODEL.META_ARCHITECTURE": "NaNAtIteration3", "SOLVER.MAX_ITER": 6, "TEST.EVAL_PERIOD": 0}
    )
    code, err = _run(capsys, args)
    assert code == 1
    assert "Non-finite loss at iteration 3: loss_source=nan" in err
    assert "the last good checkpoint is" in err and "model_0000001.pth" in err
    assert not (out / "model_final.pth").exists()
    ckpt = torch.load(out / "model_0000001.pth", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_non_finite_steps_can_be_skipped_within_a_budget(capsys, tmp_path):
    out = tmp_path / "skip"
    extra = {"MODEL.META_ARCHITECTURE": "NaNAtIteration3", "SOLVER.MAX_ITER": 5, "TEST.EVAL_PERIOD": 0}
    extra["SOLVER.MAX_SKIPPED_NONFINITE_STEPS"] = 1
    code, _ = _run(capsys, ["--config-file", SOURCE_ONLY] + tiny_overrides(str(out), **extra))
    assert code == 0
    with open(out / "log.txt") as f:
        assert "Non-finite loss at iteration 3: loss_source=nan; step skipped (1 of at most 1)" in f.read()
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert ckpt["trainer"]["_trainer"]["skipped_nonfinite"] == 1  # a resumed run keeps counting
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
