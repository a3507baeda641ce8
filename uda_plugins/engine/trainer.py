"""UDATrainer: Detectron2's DefaultTrainer for UDA meta-architectures.

What it changes, and why:

* ``__init__`` is rebuilt (as adaptive_teacher does) so that the step runner is :class:`UDAStepRunner` and DDP is
  created with the CPU-safe ``create_ddp_model``; everything else is DefaultTrainer's order of construction.
* The training loader is the UDA loader, reading what the meta-architecture's ``data_requirements`` declare;
  its seed is part of the checkpoint and ``resume_or_load`` moves it to the resumed iteration, so the data
  stream continues exactly; on resume, ``metrics.json`` drops the records the resumed run re-does.
* Hooks: Detectron2's defaults, plus the meta-architecture's own (``training_hooks``, e.g. an EMA update) placed
  before the checkpointer so checkpoints see their effect, and optionally ``BestCheckpointer`` (off by default:
  it selects on labelled target data).
* ``test`` evaluates the student, the teacher or both (``TEST.EVAL_MODEL``), with a progress bar, on every rank
  with rank 0's buffers (BatchNorm statistics), results gathered; during training it also puts a per-class IoU bar
  chart of each evaluation into TensorBoard.
* A non-finite loss stops training with the loss names and the last good checkpoint.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from typing import List

import torch
from tqdm import tqdm

from uda_plugins.d2 import (
    META_ARCH_REGISTRY,
    CfgNode,
    DefaultTrainer,
    TrainerBase,
    comm,
    create_ddp_model,
    get_event_storage,
    has_event_storage,
    hooks,
    setup_logger,
)
from uda_plugins.data.build import build_test_loader, build_uda_train_loader
from uda_plugins.evaluation import SemSegEvaluator
from uda_plugins.methods import build_meta_arch
from uda_plugins.utils.visualization import iou_bar_chart, palette_for_dataset

from .checkpoint import UDACheckpointer
from .metrics_log import prune_metrics_log
from .optim import build_lr_scheduler, build_optimizer
from .step import NonFiniteLossError, UDAStepRunner, amp_dtype

__all__ = ["UDATrainer", "unwrap_model", "eval_model_names"]

logger = logging.getLogger(__name__)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def eval_model_names(cfg: CfgNode) -> List[str]:
    choice = cfg.TEST.EVAL_MODEL
    names = {"student": ["student"], "teacher": ["teacher"], "both": ["student", "teacher"]}
    if choice not in names:
        raise ValueError(f"TEST.EVAL_MODEL must be student, teacher or both, not '{choice}'")
    return names[choice]


class _ProgressLoader:
    """A finite loader with a progress bar on the main process (tqdm hides it when stdout is not a terminal)."""

    def __init__(self, loader, desc: str) -> None:
        self.loader, self.desc = loader, desc

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(
            tqdm(
                self.loader, desc=self.desc, unit="batch", disable=None if comm.is_main_process() else True, leave=False
            )
        )


class UDATrainer(DefaultTrainer):
    def __init__(self, cfg: CfgNode) -> None:
        TrainerBase.__init__(self)
        if not logging.getLogger("uda_plugins").isEnabledFor(logging.INFO):
            setup_logger(name="uda_plugins")
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        data_loader.serve_banks_of(model)
        model = create_ddp_model(
            model, broadcast_buffers=False, find_unused_parameters=getattr(model, "ddp_find_unused_parameters", False)
        )
        self._trainer = UDAStepRunner(
            model,
            data_loader,
            optimizer,
            accumulation_steps=cfg.SOLVER.GRAD_ACCUMULATION_STEPS,
            amp=amp_dtype(cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.PRECISION, cfg.MODEL.DEVICE),
            max_skipped_nonfinite=cfg.SOLVER.MAX_SKIPPED_NONFINITE_STEPS,
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = UDACheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        model = build_meta_arch(cfg)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        logger.info(
            f"Model {cfg.MODEL.META_ARCHITECTURE}: {n_train / 1e6:.2f} M trainable / {n_all / 1e6:.2f} M parameters"
        )
        logger.debug("Model:\n{}".format(model))
        return model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        requirements = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE).data_requirements
        return build_uda_train_loader(cfg, requirements)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return _ProgressLoader(build_test_loader(cfg, dataset_name), f"eval {dataset_name}")

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)

    def build_hooks(self) -> list:
        cfg = self.cfg
        ret = [hooks.IterationTimer(), hooks.LRScheduler()]
        ret += list(getattr(unwrap_model(self.model), "training_hooks", lambda c: [])(cfg))
        if cfg.UDA.ACTIVE.ROUND_ITERS:  # before the checkpointer: a checkpoint holds its iteration's round
            from uda_plugins.hooks import ActiveLearningHook

            ret.append(ActiveLearningHook(cfg, unwrap_model(self.model)))
        if comm.is_main_process():
            keep = cfg.SOLVER.MAX_CHECKPOINTS_TO_KEEP or None
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=keep))

        def test_and_save_results():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        ret.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
        if cfg.TEST.SAVE_BEST_ON_TEST and comm.is_main_process():
            ret.append(
                hooks.BestCheckpointer(
                    cfg.TEST.EVAL_PERIOD,
                    self.checkpointer,
                    self.best_metric_name(cfg),
                    "max",
                    file_prefix="model_best_on_test",
                )
            )
        if comm.is_main_process():
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=min(20, max(1, cfg.SOLVER.MAX_ITER // 10))))
        return ret

    @staticmethod
    def best_metric_name(cfg: CfgNode) -> str:
        """The event-storage key of the first test set's mIoU for ``TEST.BEST_ON_TEST_MODEL`` (default: the first
        evaluated model)."""
        names = eval_model_names(cfg)
        chosen = cfg.TEST.BEST_ON_TEST_MODEL or names[0]
        if chosen not in names:
            raise ValueError(
                f"TEST.BEST_ON_TEST_MODEL '{chosen}' is not evaluated (TEST.EVAL_MODEL {cfg.TEST.EVAL_MODEL})"
            )
        parts = []
        if len(names) > 1:
            parts.append(chosen)
        if len(cfg.DATASETS.TEST) > 1:
            parts.append(cfg.DATASETS.TEST[0])
        return "/".join(parts + ["sem_seg", "mIoU"])

    # --------------------------------------------------------------------------------------- running
    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        self.data_loader.set_start_iter(self.start_iter)
        if resume and comm.is_main_process():
            prune_metrics_log(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter)

    def state_dict(self) -> dict:
        ret = super().state_dict()
        ret["data_loader"] = self.data_loader.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "data_loader" in state_dict:
            self.data_loader.load_state_dict(state_dict["data_loader"])

    def run_step(self) -> None:
        try:
            super().run_step()
        except NonFiniteLossError as e:
            last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else None
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
            raise NonFiniteLossError(f"{e}. Training stopped; {kept}.") from None

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None):
        """Evaluate the network(s) named by ``TEST.EVAL_MODEL`` on ``DATASETS.TEST``; with "both", results are
        ``{"student": ..., "teacher": ...}``."""
        meta_arch = unwrap_model(model)
        if comm.get_world_size() > 1:
            # BatchNorm statistics are per process (as Detectron2's, broadcast_buffers=False); every rank evaluates
            # with rank 0's, so what is evaluated is what is checkpointed. Only the evaluated networks: a method's
            # own per-rank state (e.g. QuadMix's previous batch) stays each rank's.
            for network in meta_arch.evaluable_models().values():
                for buffer in network.buffers():
                    torch.distributed.broadcast(buffer, src=0)
        results = OrderedDict()
        names = eval_model_names(cfg)
        for name in names:
            previous = meta_arch.eval_model
            meta_arch.eval_model = name
            try:
                logger.info(f"Evaluating the {name}")
                results[name] = super().test(cfg, model, evaluators)
            finally:
                meta_arch.eval_model = previous
            put_iou_charts(cfg, results[name], name if len(names) > 1 else "")
            add_mean_over_test_sets(results[name])
        return results[names[0]] if len(names) == 1 else results


MEAN_OVER_TEST_SETS = "mean_over_test_sets"


def add_mean_over_test_sets(results) -> None:
    """With several test sets (multi-target adaptation: one per target), add their mean mIoU (and the mean of every
    other ``mIoU*`` entry they all have) as ``results["mean_over_test_sets"]["sem_seg"]``, in place."""
    per_dataset = [r["sem_seg"] for r in results.values() if isinstance(r, dict) and "sem_seg" in r]
    if len(per_dataset) < 2 or "sem_seg" in results:
        return
    keys = [k for k in per_dataset[0] if k.startswith("mIoU") and all(k in r for r in per_dataset)]
    results[MEAN_OVER_TEST_SETS] = {"sem_seg": {k: sum(r[k] for r in per_dataset) / len(per_dataset) for k in keys}}
    logger.info(
        "Mean over %d test sets: %s",
        len(per_dataset),
        ", ".join(f"{k} {v:.2f}" for k, v in results[MEAN_OVER_TEST_SETS]["sem_seg"].items()),
    )


def put_iou_charts(cfg: CfgNode, results, model_name: str = "") -> None:
    """Per-class IoU bar charts of an evaluation into the event storage (TensorBoard), one per test set, tagged like
    the metrics: ``[<model>/][<dataset>/]sem_seg/per_class_iou``. Nothing outside training (``--eval-only``)."""
    if not (comm.is_main_process() and has_event_storage()):
        return
    per_dataset = {cfg.DATASETS.TEST[0]: results} if "sem_seg" in results else results
    for dataset, result in per_dataset.items():
        metrics = result.get("sem_seg", {})
        names = [k[len("IoU-") :] for k in metrics if k.startswith("IoU-")]
        if not names:
            continue
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        chart = iou_bar_chart(names, [metrics[f"IoU-{n}"] for n in names], palette_for_dataset(dataset, num_classes))
        parts = [model_name] if model_name else []
        parts += [dataset] if len(cfg.DATASETS.TEST) > 1 else []
        get_event_storage().put_image("/".join(parts + ["sem_seg", "per_class_iou"]), chart)
