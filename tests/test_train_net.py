"""tools/train_net.py end to end on the tiny synthetic pair: train, files on disk, TensorBoard, resume, eval-only,
the oracle, and two processes."""

import glob
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_overrides

sys.path.insert(0, os.path.join(REPO, "tools"))
import train_net  # noqa: E402

SOURCE_ONLY = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")
TARGET_ONLY = os.path.join(REPO, "configs", "synthetic", "target_only.yaml")


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def _event_tags(output_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(output_dir, "events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    acc = EventAccumulator(output_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("source_only"))
    assert train_net.cli(["--config-file", SOURCE_ONLY] + tiny_overrides(out)) == 0
    return out


def test_training_writes_checkpoints_logs_metrics(trained):
    files = set(os.listdir(trained))
    assert {"config.yaml", "log.txt", "metrics.json", "last_checkpoint", "model_final.pth"} <= files
    assert "model_0000001.pth" in files or "model_0000003.pth" in files
    with open(os.path.join(trained, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    ckpt = torch.load(os.path.join(trained, "model_final.pth"), map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 3 and "optimizer" in ckpt["trainer"]["_trainer"]
    assert "LRScheduler" in ckpt["trainer"]["hooks"]
    assert ckpt["trainer"]["data_loader"] == {"seed": 0}  # SEED of the config
    rows = _metrics(trained)
    # One loss: Detectron2's write_metrics logs it as total_loss only.
    assert any("total_loss" in r and "lr" in r and "data_time" in r for r in rows)
    evals = [r for r in rows if "sem_seg/mIoU" in r]
    assert len(evals) == 2  # at EVAL_PERIOD and after training
    assert "sem_seg/IoU-road" in evals[-1] and 0.0 <= evals[-1]["sem_seg/mIoU"] <= 100.0
    with open(os.path.join(trained, "inference", "synthetic_tiny_target_val", "sem_seg_evaluation.json")) as f:
        assert json.load(f)["metrics"]["mIoU"] == pytest.approx(evals[-1]["sem_seg/mIoU"])
    with open(os.path.join(trained, "log.txt")) as f:
        log = f.read()
    assert "uda_plugins backend: builtin" in log or "uda_plugins backend: detectron2" in log
    assert "Per-class results on synthetic_tiny_target_val" in log and "| road" in log


def test_tensorboard_has_losses_lr_miou_per_class_and_images(trained):
    acc = _event_tags(trained)
    scalars = set(acc.Tags()["scalars"])
    assert {"total_loss", "lr", "data_time", "sem_seg/mIoU", "sem_seg/IoU-car"} <= scalars
    images = acc.Tags()["images"]
    assert "source/input_gt_pred" in images
    img = acc.Images("source/input_gt_pred")[0]
    assert img.width == 3 * 96 and img.height == 48  # input | ground truth | prediction
    # A per-class IoU bar chart at each evaluation (19 rows + the axis), read back as pixels.
    charts = acc.Images("sem_seg/per_class_iou")
    assert len(charts) == 2 and charts[-1].width == 480 and charts[-1].height == 18 * 20 + 6
    import cv2

    chart = cv2.imdecode(np.frombuffer(charts[-1].encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
    with open(os.path.join(trained, "inference", "synthetic_tiny_target_val", "sem_seg_evaluation.json")) as f:
        metrics = json.load(f)["metrics"]
    from uda_plugins.data.labels import CITYSCAPES_19, palette

    ious = [metrics[f"IoU-{name}"] for name in CITYSCAPES_19.classes]
    best = int(np.nanargmax(ious))
    colour = palette(CITYSCAPES_19)[best][::-1]  # BGR
    bar = (chart[6 + 18 * best + 9] == colour).all(-1).sum()
    assert ious[best] > 0 and abs(bar - ious[best] * 3) <= 3  # the best class's bar: 3 px per IoU point


def test_resume_continues_from_the_last_checkpoint(trained, tmp_path):
    import shutil

    out = str(tmp_path / "resumed")
    shutil.copytree(trained, out)
    os.remove(os.path.join(out, "metrics.json"))
    assert (
        train_net.cli(["--config-file", SOURCE_ONLY, "--resume"] + tiny_overrides(out, **{"SOLVER.MAX_ITER": 6})) == 0
    )
    iters = [r["iteration"] for r in _metrics(out) if "total_loss" in r]
    assert min(iters) >= 4 and max(iters) == 5
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 5
    with open(os.path.join(out, "log.txt")) as f:
        assert "Starting training from iteration 4" in f.read()


def test_resume_falls_back_past_damaged_checkpoints(trained, tmp_path, capsys):
    import shutil

    out = str(tmp_path / "damaged")
    shutil.copytree(trained, out)
    final, third = os.path.join(out, "model_final.pth"), os.path.join(out, "model_0000003.pth")
    with open(final, "r+b") as f:
        f.truncate(os.path.getsize(final) // 2)  # a copy cut short
    with open(third, "wb") as f:
        f.write(os.urandom(1000))  # not a checkpoint at all
    args = ["--config-file", SOURCE_ONLY, "--resume"] + tiny_overrides(out, **{"SOLVER.MAX_ITER": 5})
    assert train_net.cli(args) == 0
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert f"Cannot resume from {final}" in log and f"Cannot resume from {third}" in log
    assert "Starting training from iteration 2" in log  # from model_0000001.pth, the newest readable one
    assert torch.load(final, map_location="cpu", weights_only=True)["iteration"] == 4

    # Nothing readable left: a clear error, not a silent fresh start.
    for name in os.listdir(out):
        if name.endswith(".pth"):
            with open(os.path.join(out, name), "wb") as f:
                f.write(b"garbage")
    assert train_net.cli(args) != 0
    err = capsys.readouterr().err
    assert "no readable checkpoint" in err and "model_0000001.pth" in err


def test_eval_only_reproduces_the_final_evaluation(trained, tmp_path):
    out = str(tmp_path / "eval")
    weights = os.path.join(trained, "model_final.pth")
    args = ["--config-file", SOURCE_ONLY, "--eval-only"] + tiny_overrides(out, **{"MODEL.WEIGHTS": weights})
    assert train_net.cli(args) == 0
    with open(os.path.join(out, "inference", "synthetic_tiny_target_val", "sem_seg_evaluation.json")) as f:
        miou = json.load(f)["metrics"]["mIoU"]
    final = [r for r in _metrics(trained) if "sem_seg/mIoU" in r][-1]["sem_seg/mIoU"]
    assert miou == pytest.approx(final, abs=1e-6)
    assert not os.path.exists(os.path.join(out, "model_final.pth"))


def test_eval_only_with_missing_weights_fails_clearly(tmp_path, capsys):
    args = ["--config-file", SOURCE_ONLY, "--eval-only"] + tiny_overrides(
        str(tmp_path), **{"MODEL.WEIGHTS": str(tmp_path / "nope.pth")}
    )
    assert train_net.cli(args) == 1
    assert "nope.pth' does not exist" in capsys.readouterr().err


def test_oracle_trains_on_target_labels(tmp_path):
    out = str(tmp_path / "oracle")
    assert train_net.cli(["--config-file", TARGET_ONLY] + tiny_overrides(out, **{"TEST.EVAL_PERIOD": 0})) == 0
    assert any("total_loss" in r for r in _metrics(out))
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert "source unused" in log  # the oracle never reads the source domain


def test_two_processes_on_cpu(tmp_path):
    out = str(tmp_path / "ddp")
    args = ["--config-file", SOURCE_ONLY, "--num-gpus", "2", "--dist-url", "auto"] + tiny_overrides(
        out, **{"SOLVER.MAX_ITER": 3, "TEST.EVAL_PERIOD": 0, "VIS_PERIOD": 0, "MODEL.BACKBONE.NORM": "GN"}
    )
    assert train_net.cli(args) == 0
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert os.path.isfile(os.path.join(out, "log.txt.rank1"))
    evals = [r for r in _metrics(out) if "sem_seg/mIoU" in r]
    assert len(evals) == 1


def test_several_test_sets_report_each_and_their_mean(tmp_path):
    out = str(tmp_path / "three_targets")
    tests = "('synthetic_tiny_target_val', 'synthetic_tiny_target_dusk_val', 'synthetic_tiny_target_fog_val')"
    assert train_net.cli(["--config-file", SOURCE_ONLY] + tiny_overrides(out, **{"DATASETS.TEST": tests})) == 0
    final = [r for r in _metrics(out) if "mean_over_test_sets/sem_seg/mIoU" in r][-1]
    each = [final[f"synthetic_tiny_target{s}_val/sem_seg/mIoU"] for s in ("", "_dusk", "_fog")]
    assert final["mean_over_test_sets/sem_seg/mIoU"] == pytest.approx(sum(each) / 3)
