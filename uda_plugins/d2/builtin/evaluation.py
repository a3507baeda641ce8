"""Detectron2's evaluation loop: ``DatasetEvaluator(s)``, ``inference_on_dataset`` and result helpers."""

from __future__ import annotations

import datetime
import logging
import time
from collections import OrderedDict, abc
from contextlib import ExitStack, contextmanager
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .comm import get_world_size, is_main_process

__all__ = [
    "DatasetEvaluator",
    "DatasetEvaluators",
    "inference_on_dataset",
    "inference_context",
    "print_csv_format",
    "flatten_results_dict",
]


class DatasetEvaluator:
    """``reset()``, then ``process(inputs, outputs)`` per batch, then ``evaluate()`` -> dict (None off rank 0)."""

    def reset(self) -> None:
        pass

    def process(self, inputs, outputs) -> None:
        pass

    def evaluate(self):
        pass


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators as one; their result dicts are merged (keys must be unique)."""

    def __init__(self, evaluators: List[DatasetEvaluator]) -> None:
        super().__init__()
        self._evaluators = evaluators

    def reset(self) -> None:
        for evaluator in self._evaluators:
            evaluator.reset()

    def process(self, inputs, outputs) -> None:
        for evaluator in self._evaluators:
            evaluator.process(inputs, outputs)

    def evaluate(self):
        results = OrderedDict()
        for evaluator in self._evaluators:
            result = evaluator.evaluate()
            if is_main_process() and result is not None:
                for k, v in result.items():
                    assert k not in results, "Different evaluators produce results with the same key {}".format(k)
                    results[k] = v
        return results


@contextmanager
def inference_context(model: nn.Module):
    """Temporarily put ``model`` in eval mode, restoring its training flag afterwards."""
    training_mode = model.training
    model.eval()
    yield
    model.train(training_mode)


def inference_on_dataset(
    model: Callable,
    data_loader,
    evaluator: Union[DatasetEvaluator, List[DatasetEvaluator], None],
    callbacks: Optional[Dict[str, Callable[[], None]]] = None,
) -> dict:
    """Run ``model`` (in eval mode, without grad) over a finite loader and return ``evaluator.evaluate()``."""
    num_devices = get_world_size()
    logger = logging.getLogger(__name__)
    total = len(data_loader)
    logger.info("Start inference on {} batches".format(total))
    if evaluator is None:
        evaluator = DatasetEvaluators([])
    if isinstance(evaluator, abc.MutableSequence):
        evaluator = DatasetEvaluators(evaluator)
    evaluator.reset()
    callbacks = callbacks or {}

    num_warmup = min(5, total - 1)
    start_time = time.perf_counter()
    total_compute_time = 0.0
    with ExitStack() as stack:
        if isinstance(model, nn.Module):
            stack.enter_context(inference_context(model))
        stack.enter_context(torch.no_grad())
        callbacks.get("on_start", lambda: None)()
        for idx, inputs in enumerate(data_loader):
            if idx == num_warmup:
                start_time = time.perf_counter()
                total_compute_time = 0.0
            start_compute_time = time.perf_counter()
            callbacks.get("before_inference", lambda: None)()
            outputs = model(inputs)
            callbacks.get("after_inference", lambda: None)()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            total_compute_time += time.perf_counter() - start_compute_time
            evaluator.process(inputs, outputs)
        callbacks.get("on_end", lambda: None)()

    total_time = time.perf_counter() - start_time
    n = max(total - num_warmup, 1)
    logger.info(
        "Total inference time: {} ({:.6f} s / iter per device, on {} devices)".format(
            str(datetime.timedelta(seconds=total_time)), total_time / n, num_devices
        )
    )
    logger.info(
        "Total inference pure compute time: {} ({:.6f} s / iter per device, on {} devices)".format(
            str(datetime.timedelta(seconds=int(total_compute_time))), total_compute_time / n, num_devices
        )
    )
    results = evaluator.evaluate()
    return {} if results is None else results


def print_csv_format(results: dict) -> None:
    """Log the main metrics (those without '-' in the name) as copy-pasteable CSV lines."""
    assert isinstance(results, abc.Mapping) or not len(results), results
    logger = logging.getLogger(__name__)
    for task, res in results.items():
        if isinstance(res, abc.Mapping):
            important_res = [(k, v) for k, v in res.items() if "-" not in k]
            logger.info("copypaste: Task: {}".format(task))
            logger.info("copypaste: " + ",".join([k[0] for k in important_res]))
            logger.info("copypaste: " + ",".join(["{0:.4f}".format(k[1]) for k in important_res]))
        else:
            logger.info(f"copypaste: {task}={res}")


def flatten_results_dict(results: dict) -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``."""
    r = {}
    for k, v in results.items():
        if isinstance(v, abc.Mapping):
            for kk, vv in flatten_results_dict(v).items():
                r[k + "/" + kk] = vv
        else:
            r[k] = v
    return r
