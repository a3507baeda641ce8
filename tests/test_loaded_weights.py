"""No number from weights that were not loaded, and class counts checked before anything runs: a 19-class checkpoint
under a 3-class config, a method whose teacher the checkpoint lacks, a NUM_CLASSES the datasets do not have."""

import os
import sys

import pytest
from conftest import REPO, tiny_overrides

sys.path.insert(0, os.path.join(REPO, "tools"))
import predict  # noqa: E402
import train_net  # noqa: E402

SOURCE_ONLY = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")
DACS = os.path.join(REPO, "configs", "synthetic", "dacs.yaml")


@pytest.fixture(scope="module")
def checkpoint_19(tmp_path_factory):
    """A source-only model of the 19 synthetic classes: student weights only, no teacher."""
    out = str(tmp_path_factory.mktemp("trained19"))
    overrides = tiny_overrides(out, **{"SOLVER.MAX_ITER": 2, "TEST.EVAL_PERIOD": 0, "VIS_PERIOD": 0})
    assert train_net.cli(["--config-file", SOURCE_ONLY] + overrides) == 0
    return os.path.join(out, "model_final.pth")


def _three_classes(custom, out, **extra):  # noqa: F811
    values = {
        "DATASETS.REGISTER": f"('{custom / 'datasets.json'}',)",
        "DATASETS.SOURCE_TRAIN": "('mine_train',)",
        "DATASETS.TARGET_TRAIN": "('mine_target',)",
        "DATASETS.TEST": "('mine_val',)",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 3,
        "SOLVER.MAX_ITER": 2,
        "TEST.EVAL_PERIOD": 0,
        "VIS_PERIOD": 0,
    }
    values.update(extra)
    return tiny_overrides(out, **values)


def _error(capsys, prog="train_net.py") -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_eval_only_with_a_checkpoint_of_another_class_count_stops_naming_the_keys(
    custom,
    checkpoint_19,
    tmp_path,
    capsys,  # noqa: F811
):
    out = str(tmp_path / "eval")
    overrides = _three_classes(custom, out, **{"MODEL.WEIGHTS": checkpoint_19})
    assert train_net.cli(["--config-file", SOURCE_ONLY, "--eval-only"] + overrides) == 1
    line = _error(capsys)
    assert f"MODEL.WEIGHTS '{checkpoint_19}' does not fit the student network this config builds" in line
    assert "student.head.classifier.weight (file (19, 64, 1, 1), model (3, 64, 1, 1))" in line
    assert not os.path.exists(os.path.join(out, "inference"))  # nothing was scored
    # predict.py takes the same path.
    image = next(p for p in (custom / "images" / "val" / "site0").iterdir())
    args = ["--config-file", SOURCE_ONLY, "--input", str(image), "--output", str(tmp_path / "pred")]
    assert predict.main(args + _three_classes(custom, out, **{"MODEL.WEIGHTS": checkpoint_19})) == 1
    assert "does not fit the student network" in _error(capsys, "predict.py")


def test_a_network_that_is_not_evaluated_may_be_missing(checkpoint_19, tmp_path):
    out = str(tmp_path / "dacs_eval")
    args = ["--config-file", DACS, "--eval-only"] + tiny_overrides(out, **{"MODEL.WEIGHTS": checkpoint_19})
    assert train_net.cli(args) == 0  # DACS's student from a source-only checkpoint: every student tensor is there
    with open(os.path.join(out, "log.txt")) as f:
        assert "MODEL.WEIGHTS holds nothing for ema_updates, teacher: not evaluated, left as initialised" in f.read()


def test_the_evaluated_network_may_not(checkpoint_19, tmp_path, capsys):
    teacher = tiny_overrides(str(tmp_path / "t"), **{"MODEL.WEIGHTS": checkpoint_19, "TEST.EVAL_MODEL": "teacher"})
    assert train_net.cli(["--config-file", DACS, "--eval-only"] + teacher) == 1
    line = _error(capsys)
    assert "does not fit the teacher network" in line and "teacher.backbone" in line and "(not in the file)" in line


def test_training_from_weights_that_partly_fit_starts_with_one_summary_line(
    custom,
    checkpoint_19,
    tmp_path,  # noqa: F811
):
    out = str(tmp_path / "finetune")
    args = ["--config-file", SOURCE_ONLY] + _three_classes(custom, out, **{"MODEL.WEIGHTS": checkpoint_19})
    assert train_net.cli(args) == 0  # as initialisation, Detectron2's skip-with-warning stays
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert "2 tensors of the model were not loaded and keep their initialisation: 2 of another shape in the file" in log
    assert "student.head.classifier.weight" in log


def test_a_class_count_the_datasets_do_not_have_stops_before_anything_runs(custom, tmp_path, capsys):  # noqa: F811
    out = str(tmp_path / "nineteen")
    args = ["--config-file", SOURCE_ONLY] + _three_classes(custom, out, **{"MODEL.SEM_SEG_HEAD.NUM_CLASSES": 19})
    assert train_net.cli(args) == 1
    line = _error(capsys)
    assert "MODEL.SEM_SEG_HEAD.NUM_CLASSES is 19 but dataset 'mine_train' (DATASETS.SOURCE_TRAIN) has 3 classes" in line
    assert "(ground, wall, grass): set NUM_CLASSES 3" in line
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    assert train_net.cli(args[:2] + ["--eval-only"] + args[2:]) == 1
    assert "has 3 classes" in _error(capsys)
    image = next(p for p in (custom / "images" / "val" / "site0").iterdir())
    pred = ["--config-file", SOURCE_ONLY, "--input", str(image), "--output", str(tmp_path / "pred")]
    assert predict.main(pred + args[2:]) == 1
    assert "has 3 classes" in _error(capsys, "predict.py")
