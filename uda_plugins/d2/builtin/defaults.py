"""Detectron2's ``engine.defaults``: the argument parser, ``default_setup``, the default writers,
``create_ddp_model`` and ``DefaultTrainer``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import weakref
from collections import OrderedDict
from typing import List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from . import comm, hooks
from .checkpoint import DetectionCheckpointer
from .evaluation import DatasetEvaluator, inference_on_dataset, print_csv_format
from .events import CommonMetricPrinter, EventWriter, JSONWriter, TensorboardXWriter
from .logger import seed_all_rng, setup_logger
from .modeling import build_model
from .train_loop import SimpleTrainer, TrainerBase

__all__ = [
    "create_ddp_model",
    "default_argument_parser",
    "default_setup",
    "default_writers",
    "DefaultTrainer",
]


def create_ddp_model(model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs) -> torch.nn.Module:
    """Wrap ``model`` in DistributedDataParallel when there is more than one process.

    Unlike Detectron2's (docs/detectron2-api.md §4.7), it passes ``device_ids`` only for CUDA models, so that
    multi-process CPU training (gloo) works; that is how the test suite exercises DDP.
    """
    if comm.get_world_size() == 1:
        return model
    on_cuda = next(model.parameters()).is_cuda
    if "device_ids" not in kwargs and on_cuda:
        kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


def default_argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """``--config-file``, ``--resume``, ``--eval-only``, ``--num-gpus``, ``--num-machines``,
    ``--machine-rank``, ``--dist-url`` and trailing ``KEY VALUE`` config overrides."""
    parser = argparse.ArgumentParser(
        epilog=epilog
        or f"""
Examples:

Run on single machine:
    $ {sys.argv[0]} --num-gpus 8 --config-file cfg.yaml

Change some config options:
    $ {sys.argv[0]} --config-file cfg.yaml MODEL.WEIGHTS /path/to/weight.pth SOLVER.BASE_LR 0.001

Run on multiple machines:
    (machine0)$ {sys.argv[0]} --machine-rank 0 --num-machines 2 --dist-url <URL> [--other-flags]
    (machine1)$ {sys.argv[0]} --machine-rank 1 --num-machines 2 --dist-url <URL> [--other-flags]
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument(
        "--resume", action="store_true", help="resume from the last checkpoint in OUTPUT_DIR, if there is one"
    )
    parser.add_argument("--eval-only", action="store_true", help="perform evaluation only")
    parser.add_argument("--num-gpus", type=int, default=1, help="number of processes (devices) *per machine*")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine (unique per machine)")
    # A deterministic port, so that an orphaned process from an earlier run shows up as a busy port.
    port = 2**15 + 2**14 + hash(os.getuid() if sys.platform != "win32" else 1) % 2**14
    parser.add_argument(
        "--dist-url",
        default="tcp://127.0.0.1:{}".format(port),
        help="initialization URL for the pytorch distributed backend ('auto' picks a free port)",
    )
    parser.add_argument(
        "opts",
        help='Modify config options at the end of the command, as space-separated "PATH.KEY VALUE" pairs.',
        default=None,
        nargs=argparse.REMAINDER,
    )
    return parser


def _collect_env_info() -> str:
    lines = [
        f"sys.platform: {sys.platform}",
        f"Python: {sys.version.replace(chr(10), ' ')}",
        f"PyTorch: {torch.__version__}",
        f"CUDA available: {torch.cuda.is_available()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"GPU 0: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})")
    lines.append(f"torch threads: {torch.get_num_threads()}")
    return "\n".join(lines)


def default_setup(cfg, args) -> None:
    """Create OUTPUT_DIR, set up logging to ``OUTPUT_DIR/log.txt``, log the environment, the arguments and the
    config, save ``OUTPUT_DIR/config.yaml``, seed every RNG with ``SEED + rank`` (fresh seed when SEED < 0)
    and apply ``CUDNN_BENCHMARK``."""
    output_dir = cfg.OUTPUT_DIR
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
    rank = comm.get_rank()
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    logger = setup_logger(output_dir, distributed_rank=rank)
    logger.info("Rank of current process: {}. World size: {}".format(rank, comm.get_world_size()))
    logger.info("Environment info:\n" + _collect_env_info())
    logger.info("Command line arguments: " + str(args))
    if getattr(args, "config_file", ""):
        with open(args.config_file, "r") as f:
            logger.info("Contents of args.config_file={}:\n{}".format(args.config_file, f.read()))
    if comm.is_main_process() and output_dir:
        path = os.path.join(output_dir, "config.yaml")
        logger.info("Running with full config:\n{}".format(cfg.dump()))
        with open(path, "w") as f:
            f.write(cfg.dump())
        logger.info("Full config saved to {}".format(path))
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK


def default_writers(output_dir: str, max_iter: Optional[int] = None) -> List[EventWriter]:
    """Console printer, ``metrics.json`` and TensorBoard event files in ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    return [
        CommonMetricPrinter(max_iter),
        JSONWriter(os.path.join(output_dir, "metrics.json")),
        TensorboardXWriter(output_dir),
    ]


class DefaultTrainer(TrainerBase):
    """The standard training/evaluation flow: model, optimizer, loader, DDP, scheduler, checkpointer and the
    default hooks, each built by an overridable classmethod. The builtin backend has no detection loaders,
    optimizers or schedulers of its own, so ``build_train_loader``, ``build_test_loader``,
    ``build_optimizer``, ``build_lr_scheduler`` and ``build_evaluator`` must be overridden (UDATrainer does)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        if cfg.SOLVER.AMP.ENABLED:
            raise NotImplementedError("The builtin DefaultTrainer has no AMPTrainer; UDATrainer handles AMP.")
        self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume: bool = True) -> None:
        """With ``resume`` and a ``last_checkpoint`` in OUTPUT_DIR: load everything from it (model, optimizer,
        scheduler, hook states, iteration). Otherwise load only the model weights from ``MODEL.WEIGHTS``."""
        self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            # The checkpoint stores the iteration that just finished.
            self.start_iter = self.iter + 1

    def build_hooks(self) -> List[hooks.HookBase]:
        cfg = self.cfg
        ret: List = [hooks.IterationTimer(), hooks.LRScheduler()]
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))

        def test_and_save_results():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        ret.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
        if comm.is_main_process():
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=20))
        return ret

    def build_writers(self) -> List[EventWriter]:
        return default_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    def train(self):
        super().train(self.start_iter, self.max_iter)
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            assert hasattr(self, "_last_eval_results"), "No evaluation results obtained during training!"
            return self._last_eval_results

    def run_step(self) -> None:
        self._trainer.iter = self.iter
        self._trainer.run_step()

    def state_dict(self) -> dict:
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_model(cls, cfg) -> torch.nn.Module:
        model = build_model(cfg)
        logging.getLogger(__name__).info("Model:\n{}".format(model))
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        raise NotImplementedError("The builtin backend has no default optimizer builder; override build_optimizer.")

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        raise NotImplementedError("The builtin backend has no default scheduler builder; override build_lr_scheduler.")

    @classmethod
    def build_train_loader(cls, cfg):
        raise NotImplementedError("The builtin backend has no detection loaders; override build_train_loader.")

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        raise NotImplementedError("The builtin backend has no detection loaders; override build_test_loader.")

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        raise NotImplementedError("Implement `build_evaluator()` in a subclass to evaluate during training.")

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on every dataset of ``DATASETS.TEST``; ``{name: results}``, collapsed to the
        results themselves when there is a single dataset."""
        logger = logging.getLogger(__name__)
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None:
            assert len(cfg.DATASETS.TEST) == len(evaluators), "{} != {}".format(len(cfg.DATASETS.TEST), len(evaluators))
        results = OrderedDict()
        for idx, dataset_name in enumerate(cfg.DATASETS.TEST):
            data_loader = cls.build_test_loader(cfg, dataset_name)
            if evaluators is not None:
                evaluator = evaluators[idx]
            else:
                try:
                    evaluator = cls.build_evaluator(cfg, dataset_name)
                except NotImplementedError:
                    logger.warning("No evaluator found; implement `build_evaluator`.")
                    results[dataset_name] = {}
                    continue
            results_i = inference_on_dataset(model, data_loader, evaluator)
            results[dataset_name] = results_i
            if comm.is_main_process():
                assert isinstance(results_i, dict), f"Evaluator must return a dict on the main process, got {results_i}"
                logger.info("Evaluation results for {} in csv format:".format(dataset_name))
                print_csv_format(results_i)
        if len(results) == 1:
            results = list(results.values())[0]
        return results

    @property
    def model(self) -> torch.nn.Module:
        return self._trainer.model

    @property
    def data_loader(self):
        return self._trainer.data_loader

    @property
    def optimizer(self):
        return self._trainer.optimizer
