"""Semantic-segmentation metrics from a confusion matrix accumulated on the device.

Metric names follow Detectron2's SemSegEvaluator (``mIoU``, ``fwIoU``, ``mACC``, ``pACC``, ``IoU-<class>``,
``ACC-<class>``, in percent) so the usual tooling reads them, and so does its convention for classes absent
from the ground truth: their IoU/ACC is NaN, and mIoU averages the IoUs over the classes present in the ground
truth or the prediction (a class that is only predicted counts as 0). On Cityscapes val, where every class is
present, this equals mmseg's convention used by the papers. Class subsets from the dataset metadata
(``eval_subsets``, e.g. SYNTHIA's 16 and 13 classes) add ``mIoU_<subset>``, computed from the same matrix.

Unlike Detectron2's evaluator it reads the label from the input dict (the test mapper loads it at full
resolution) instead of re-reading the file, and encodes no per-image prediction JSON.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tabulate import tabulate

from uda_plugins.d2 import DatasetEvaluator, MetadataCatalog, comm
from uda_plugins.modeling import predicted_classes
from uda_plugins.utils.file_io import atomic_write_text

__all__ = ["SemSegEvaluator", "metrics_from_confusion"]

logger = logging.getLogger(__name__)


def metrics_from_confusion(
    conf: np.ndarray, class_names: Sequence[str], subsets: Optional[Dict[str, Sequence[int]]] = None
) -> "OrderedDict[str, float]":
    """``conf[gt, pred]`` pixel counts (C x C) -> the metric dict (percent)."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    pos_gt = conf.sum(1)
    pos_pred = conf.sum(0)
    union = pos_gt + pos_pred - tp
    gt_present = pos_gt > 0
    seen = (pos_gt + pos_pred) > 0
    iou = np.full(len(tp), np.nan)
    acc = np.full(len(tp), np.nan)
    iou[gt_present] = tp[gt_present] / union[gt_present]
    acc[gt_present] = tp[gt_present] / pos_gt[gt_present]

    def mean_iou(classes: np.ndarray) -> float:
        denom = seen[classes].sum()
        return float(np.nansum(iou[classes]) / denom) if denom else float("nan")

    total = pos_gt.sum()
    res: "OrderedDict[str, float]" = OrderedDict()
    res["mIoU"] = 100 * mean_iou(np.arange(len(tp)))
    res["fwIoU"] = 100 * float(np.nansum(iou * pos_gt) / total) if total else float("nan")
    res["mACC"] = 100 * float(np.nansum(acc) / gt_present.sum()) if gt_present.any() else float("nan")
    res["pACC"] = 100 * float(tp.sum() / total) if total else float("nan")
    for name, classes in (subsets or {}).items():
        res[f"mIoU_{name}"] = 100 * mean_iou(np.asarray(classes, dtype=np.int64))
    for i, name in enumerate(class_names):
        res[f"IoU-{name}"] = 100 * float(iou[i])
    for i, name in enumerate(class_names):
        res[f"ACC-{name}"] = 100 * float(acc[i])
    return res


class SemSegEvaluator(DatasetEvaluator):
    """mIoU & co. over a dataset; with ``distributed`` the per-rank matrices are summed on rank 0."""

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: Optional[str] = None) -> None:
        meta = MetadataCatalog.get(dataset_name)
        self.dataset_name = dataset_name
        self.class_names: List[str] = list(meta.stuff_classes)
        self.ignore_label: int = meta.get("ignore_label", 255)
        self.subsets: Dict[str, List[int]] = dict(meta.get("eval_subsets", {}) or {})
        self._distributed = distributed
        self._output_dir = output_dir
        self._num_classes = len(self.class_names)
        self._conf: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self._conf = None

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        n = self._num_classes
        for inp, out in zip(inputs, outputs):
            if "sem_seg" not in inp:
                raise KeyError(f"'{inp.get('file_name')}' has no label; cannot evaluate an unlabelled split")
            logits = out["sem_seg"]
            pred = predicted_classes(logits, dim=0)
            gt = inp["sem_seg"].to(pred.device)
            if gt.shape != pred.shape:
                raise ValueError(
                    f"Prediction {tuple(pred.shape)} and label {tuple(gt.shape)} of '{inp.get('file_name')}' differ "
                    f"in size; predictions must be returned at the input's height x width"
                )
            if self._conf is None:
                self._conf = torch.zeros(n * n, dtype=torch.int64, device=pred.device)
            valid = gt != self.ignore_label
            self._conf += torch.bincount(gt[valid] * n + pred[valid], minlength=n * n)

    def evaluate(self):
        n = self._num_classes
        conf = self._conf.cpu() if self._conf is not None else torch.zeros(n * n, dtype=torch.int64)
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(conf)
            if not comm.is_main_process():
                return None
            conf = torch.stack(gathered).sum(0)
        conf = conf.view(n, n).numpy()
        res = metrics_from_confusion(conf, self.class_names, self.subsets)
        self._log_table(res)
        if self._output_dir:
            atomic_write_text(
                os.path.join(self._output_dir, "sem_seg_evaluation.json"),
                json.dumps({"dataset": self.dataset_name, "metrics": res, "confusion": conf.tolist()}, indent=1),
            )
        return OrderedDict(sem_seg=res)

    def _log_table(self, res: Dict[str, float]) -> None:
        rows = [(name, res[f"IoU-{name}"], res[f"ACC-{name}"]) for name in self.class_names]
        table = tabulate(rows, headers=["class", "IoU", "Acc"], floatfmt=".2f", tablefmt="pipe", missingval="-")
        summary = ", ".join(f"{k} {v:.2f}" for k, v in res.items() if "-" not in k)
        logger.info(f"Per-class results on {self.dataset_name}:\n{table}\n{summary}")
