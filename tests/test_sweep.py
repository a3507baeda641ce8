"""Seed sweeps: tools/seed_sweep.py end to end on the tiny pair, and the collapse flag on hand-made metrics."""

import os
import sys

import pytest
from conftest import REPO, tiny_overrides

from uda_plugins.engine.sweep import collapsed_classes, parse_sweep_args, per_class_range_table

sys.path.insert(0, os.path.join(REPO, "tools"))
import seed_sweep  # noqa: E402


def _metrics(miou, **iou):
    out = {"mIoU": miou}
    out.update({f"IoU-{k}": v for k, v in iou.items()})
    return out


def test_collapsed_class_is_flagged_only_where_the_mean_is_high():
    nan = float("nan")
    per_seed = {
        0: _metrics(50, road=90.0, pole=30.0, bus=0.5, sky=nan),
        1: _metrics(40, road=91.0, pole=0.4, bus=0.2, sky=nan),
        2: _metrics(45, road=89.0, pole=35.0, bus=0.0, sky=nan),
    }
    assert collapsed_classes(per_seed) == [("pole", 1, 0.4, (30.0 + 0.4 + 35.0) / 3)]  # bus: low everywhere
    table = per_class_range_table(per_seed)
    assert "COLLAPSED" in table and "0.4 (seed 1)" in table and "sky" not in table


def test_seed_sweep_runs_each_seed_once_and_resumes(tmp_path, capsys):
    config = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")
    overrides = tiny_overrides("unused", **{"SOLVER.MAX_ITER": 2, "TEST.EVAL_PERIOD": 0, "VIS_PERIOD": 0})
    overrides = overrides[: overrides.index("OUTPUT_DIR")]  # the sweep sets OUTPUT_DIR and SEED per run
    overrides += ["SOLVER.CHECKPOINT_PERIOD", "1{seed}"]  # {seed}: each run's own seed
    args = ["--config-file", config, "--seeds", "3", "4", "--output-dir", str(tmp_path)] + overrides
    assert seed_sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "2 runs, 0 already done" in out and "per seed [3, 4]" in out and "IoU mean ± std" in out
    for seed in (3, 4):
        assert os.path.isfile(tmp_path / "source_only" / f"seed{seed}" / "model_final.pth")
        written = (tmp_path / "source_only" / f"seed{seed}" / "config.yaml").read_text()
        assert f"CHECKPOINT_PERIOD: 1{seed}\n" in written
    assert os.path.isfile(tmp_path / "source_only" / "sweep.md")
    assert seed_sweep.main(args) == 0  # finished runs are not repeated
    assert "2 runs, 2 already done" in capsys.readouterr().out


def test_final_metrics_read_the_first_configured_test_set(tmp_path):
    import json

    from uda_plugins.engine.sweep import final_metrics

    run = tmp_path / "run"
    (run / "inference" / "b_first").mkdir(parents=True)
    (run / "inference" / "a_second").mkdir(parents=True)
    (run / "config.yaml").write_text("DATASETS:\n  TEST: [b_first, a_second]\n")
    assert final_metrics(str(run)) is None  # not finished
    (run / "model_final.pth").write_bytes(b"")
    for name, miou in (("b_first", 1.0), ("a_second", 2.0)):
        (run / "inference" / name / "sem_seg_evaluation.json").write_text(json.dumps({"metrics": {"mIoU": miou}}))
    assert final_metrics(str(run)) == {"mIoU": 1.0}  # the configured order, not the alphabetical one


def test_sweep_command_line_lists_the_configs_and_rejects_a_missing_one(tmp_path, capsys):
    config = os.path.join(REPO, "configs", "synthetic", "dacs.yaml")
    argv = ["--config-file", config, "--seeds", "3", "--jobs", "2", "SOLVER.MAX_ITER", "4"]
    args = parse_sweep_args(argv, "", "out", single_config=True)
    assert args.configs == [config] and args.seeds == [3] and args.opts == ["SOLVER.MAX_ITER", "4"]
    assert args.output_dir == "out" and args.jobs == 2
    with pytest.raises(SystemExit):
        parse_sweep_args(["--configs", config, str(tmp_path / "missing.yaml")], "", "out")
    assert "missing.yaml' does not exist" in capsys.readouterr().err
