"""Metrics from a confusion matrix, the evaluator, and its distributed gather."""

import json
import math
import os

import numpy as np
import pytest
import torch

from uda_plugins.d2 import MetadataCatalog, launch
from uda_plugins.evaluation import SemSegEvaluator, metrics_from_confusion


def test_metrics_on_a_hand_made_confusion_matrix():
    # rows = ground truth, columns = prediction; class 2 never occurs in the ground truth but is predicted once,
    # class 3 occurs nowhere.
    conf = np.array(
        [
            [8, 2, 0, 0],
            [1, 4, 1, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
        ]
    )
    res = metrics_from_confusion(conf, ["a", "b", "c", "d"], subsets={"ab": [0, 1], "ac": [0, 2]})
    iou_a, iou_b = 8 / (10 + 9 - 8), 4 / (6 + 6 - 4)
    assert res["IoU-a"] == pytest.approx(100 * iou_a)
    assert res["IoU-b"] == pytest.approx(100 * iou_b)
    assert math.isnan(res["IoU-c"]) and math.isnan(res["IoU-d"])  # absent from the ground truth
    # Detectron2's mean: over classes in the ground truth or the prediction (c counts as 0, d not at all).
    assert res["mIoU"] == pytest.approx(100 * (iou_a + iou_b) / 3)
    assert res["mIoU_ab"] == pytest.approx(100 * (iou_a + iou_b) / 2)
    assert res["mIoU_ac"] == pytest.approx(100 * iou_a / 2)
    assert res["pACC"] == pytest.approx(100 * 12 / 16)
    assert res["mACC"] == pytest.approx(100 * (0.8 + 4 / 6) / 2)
    assert res["fwIoU"] == pytest.approx(100 * (10 * iou_a + 6 * iou_b) / 16)


def _register(name):
    if name not in MetadataCatalog.list():
        MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c"], ignore_label=255, eval_subsets={"ab": [0, 1]})


def _logits(pred, n=3):
    return torch.nn.functional.one_hot(pred, n).permute(2, 0, 1).float()


def test_evaluator_perfect_and_ignored_pixels(tmp_path):
    _register("eval_toy")
    ev = SemSegEvaluator("eval_toy", distributed=False, output_dir=str(tmp_path))
    ev.reset()
    gt = torch.tensor([[0, 1], [2, 255]])
    ev.process([{"sem_seg": gt}], [{"sem_seg": _logits(gt.clamp(max=2))}])
    res = ev.evaluate()["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0) and res["mIoU_ab"] == pytest.approx(100.0)
    saved = json.load(open(tmp_path / "sem_seg_evaluation.json"))
    assert saved["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # the ignored pixel is not counted


def test_evaluator_rejects_a_prediction_of_the_wrong_size():
    _register("eval_toy")
    ev = SemSegEvaluator("eval_toy", distributed=False)
    ev.reset()
    with pytest.raises(ValueError, match="differ in size"):
        ev.process(
            [{"sem_seg": torch.zeros(4, 4, dtype=torch.long), "file_name": "x.png"}],
            [{"sem_seg": torch.zeros(3, 2, 2)}],
        )


def _distributed_eval(out_dir):
    from uda_plugins.d2 import comm

    _register("eval_toy")
    ev = SemSegEvaluator("eval_toy", distributed=True)
    ev.reset()
    rank = comm.get_rank()
    gt = torch.tensor([[0, 0, 1, 1]]) if rank == 0 else torch.tensor([[2, 2, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 1]]) if rank == 0 else torch.tensor([[2, 2, 0, 0]])
    ev.process([{"sem_seg": gt}], [{"sem_seg": _logits(pred)}])
    res = ev.evaluate()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res["sem_seg"] if res else None, f)


def test_evaluator_gathers_over_processes(tmp_path):
    launch(_distributed_eval, 2, dist_url="auto", args=(str(tmp_path),))
    r0 = json.load(open(tmp_path / "rank0.json"))
    assert json.load(open(tmp_path / "rank1.json")) is None  # results on the main process only
    single = metrics_from_confusion(np.array([[2, 1, 0], [0, 2, 0], [1, 0, 2]]), ["a", "b", "c"], {"ab": [0, 1]})
    for k, v in single.items():
        assert r0[k] == pytest.approx(v), k
