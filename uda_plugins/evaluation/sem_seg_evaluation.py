"""Semantic-segmentation metrics from a confusion matrix accumulated on the device.

Metric names follow Detectron2's SemSegEvaluator (``mIoU``, ``fwIoU``, ``mACC``, ``pACC``, ``IoU-<class>``,
``ACC-<class>``, in percent) so the usual tooling reads them, and so does its convention for classes absent
from the ground truth: their IoU/ACC is NaN, and mIoU averages the IoUs over the classes present in the ground
truth or the prediction (a class that is only predicted counts as 0). On Cityscapes val, where every class is
present, this equals mmseg's convention used by the papers. Class subsets from the dataset metadata
(``eval_subsets``, e.g. SYNTHIA's 16 and 13 classes) add ``mIoU_<subset>``, computed from the same matrix.

Unlike Detectron2's evaluator it reads the label from the input dict (the test mapper loads it at full
resolution) instead of re-reading the file, and encodes no per-image prediction JSON.

Where the inputs also carry ``sem_seg_at_input`` (``TEST.EVAL_RESOLUTION input``, MCL's protocol: the prediction at
the network's input size against the label nearest-resized to it), every metric is computed that way, and
``mIoU_full_resolution`` (with ``mIoU_<subset>_full_resolution``) gives the full-resolution score beside it; the log
says which is which.
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
        self._conf_at_input: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self._conf = self._conf_at_input = None

    def _confusion(self, logits: torch.Tensor, gt: torch.Tensor, file_name) -> torch.Tensor:
        n = self._num_classes
        pred = predicted_classes(logits, dim=0)
        gt = gt.to(pred.device)
        if gt.shape != pred.shape:
            raise ValueError(
                f"Prediction {tuple(pred.shape)} and label {tuple(gt.shape)} of '{file_name}' differ "
                f"in size; predictions must be returned at the input's height x width"
            )
        valid = gt != self.ignore_label
        return torch.bincount(gt[valid] * n + pred[valid], minlength=n * n)

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            if "sem_seg" not in inp:
                raise KeyError(f"'{inp.get('file_name')}' has no label; cannot evaluate an unlabelled split")
            conf = self._confusion(out["sem_seg"], inp["sem_seg"], inp.get("file_name"))
            self._conf = conf if self._conf is None else self._conf + conf
            if "sem_seg_at_input" in inp:
                conf = self._confusion(out["sem_seg_at_input"], inp["sem_seg_at_input"], inp.get("file_name"))
                self._conf_at_input = conf if self._conf_at_input is None else self._conf_at_input + conf

    def _gathered(self, conf: Optional[torch.Tensor]) -> Optional[np.ndarray]:
        """The confusion matrix summed over processes (None off the main process)."""
        n = self._num_classes
        conf = conf.cpu() if conf is not None else torch.zeros(n * n, dtype=torch.int64)
        if self._distributed:
            gathered = comm.gather(conf)
            if not comm.is_main_process():
                return None
            conf = torch.stack(gathered).sum(0)
        return conf.view(n, n).numpy()

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
        # Every process must take part in both gathers (the protocol is the config's, the same on all).
        at_input = self._conf_at_input is not None
        if self._distributed:
            at_input = any(comm.all_gather(at_input))
        full = self._gathered(self._conf)
        conf_at_input = self._gathered(self._conf_at_input) if at_input else None
        if full is None:
            return None
        res = metrics_from_confusion(full, self.class_names, self.subsets)
        protocol = "at each label's full resolution"
        if at_input:
            full_res = res
            res = metrics_from_confusion(conf_at_input, self.class_names, self.subsets)
            for key in [k for k in full_res if k.startswith("mIoU")]:
                res[f"{key}_full_resolution"] = full_res[key]
            protocol = (
                "at the network's input size against labels nearest-resized to it (TEST.EVAL_RESOLUTION input); "
                "mIoU_full_resolution at each label's full resolution"
            )
        self._log_table(res, protocol)
        if self._output_dir:
            record = {"dataset": self.dataset_name, "protocol": protocol, "metrics": res, "confusion": full.tolist()}
            if at_input:
                record["confusion"] = conf_at_input.tolist()
                record["confusion_full_resolution"] = full.tolist()
            atomic_write_text(os.path.join(self._output_dir, "sem_seg_evaluation.json"), json.dumps(record, indent=1))
        return OrderedDict(sem_seg=res)

    def _log_table(self, res: Dict[str, float], protocol: str) -> None:
        rows = [(name, res[f"IoU-{name}"], res[f"ACC-{name}"]) for name in self.class_names]
        table = tabulate(rows, headers=["class", "IoU", "Acc"], floatfmt=".2f", tablefmt="pipe", missingval="-")
        summary = ", ".join(f"{k} {v:.2f}" for k, v in res.items() if "-" not in k)
        logger.info(f"Per-class results on {self.dataset_name}, scored {protocol}:\n{table}\n{summary}")
