#!/usr/bin/env python
"""Train or evaluate a UDA method, the Detectron2 way.

python tools/train_net.py --config-file configs/synthetic/source_only.yaml [--num-gpus N] [KEY VALUE ...]
python tools/train_net.py --config-file <cfg> --resume                 # continue from OUTPUT_DIR
python tools/train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <checkpoint>
tensorboard --logdir <OUTPUT_DIR>
"""

import logging
import sys

import uda_plugins  # noqa: F401  (registers datasets, models and methods)
from uda_plugins.d2 import default_argument_parser, launch
from uda_plugins.engine import UDACheckpointer, UDATrainer, setup_cfg
from uda_plugins.engine.checkpoint import load_evaluated_weights
from uda_plugins.engine.preflight import preflight
from uda_plugins.utils.cli import print_error

logger = logging.getLogger("uda_plugins.train_net")


def main(args):
    cfg = setup_cfg(args)
    preflight(cfg, args.config_file, resume=args.resume, eval_only=args.eval_only)
    if args.eval_only:
        model = UDATrainer.build_model(cfg)
        checkpointer = UDACheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        resumed = args.resume and checkpointer.has_checkpoint()  # the run's last checkpoint, as Detectron2 does
        weights = checkpointer.get_checkpoint_file() if resumed else cfg.MODEL.WEIGHTS
        if weights:
            load_evaluated_weights(model, weights, cfg.TEST.EVAL_MODEL, save_dir=cfg.OUTPUT_DIR)
        else:
            logger.warning("--eval-only without MODEL.WEIGHTS: evaluating a randomly initialised model")
        return UDATrainer.test(cfg, model)
    trainer = UDATrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None) -> int:
    args = default_argument_parser().parse_args(argv)
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except (FileNotFoundError, KeyError, ValueError, OSError, FloatingPointError, NotImplementedError) as e:
        # Bad input gets one line; the traceback is in OUTPUT_DIR/log.txt when logging was set up.
        logger.debug("Traceback:", exc_info=True)
        return print_error("train_net.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
