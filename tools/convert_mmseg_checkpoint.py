#!/usr/bin/env python
"""Convert a published DAFormer / HRDA / MIC checkpoint (mmsegmentation) into this project's naming.

    python tools/convert_mmseg_checkpoint.py --config-file configs/gta5_cityscapes/mic_hrda_mitb5.yaml \\
        --input <downloaded .pth> --output pretrained/mic_hrda_mitb5_gta.pth
    python tools/train_net.py --config-file configs/gta5_cityscapes/mic_hrda_mitb5.yaml --eval-only \\
        MODEL.WEIGHTS pretrained/mic_hrda_mitb5_gta.pth [TEST.EVAL_MODEL teacher]

``--config-file`` must describe the checkpoint's network (backbone, head, HRDA or not, number of classes): the model
is built from it (without ImageNet weights) and every converted tensor must fit its parameter. The student
(``model.*``), the EMA teacher (``ema_model.*``) and the feature-distance ImageNet encoder (``imnet_model.*``) are
converted where the method has them, and so is a Guidance Training checkpoint's Guider (``model.guider.*``, or the
logged run's ``model.completor.*``); every student parameter must be found. Key mapping:
:mod:`uda_plugins.modeling.mmseg_conversion`. The output holds ``{"model": state_dict}``, written atomically.
"""

import argparse
import logging
import os
import sys

import torch

import uda_plugins  # noqa: F401  (registration)
from uda_plugins.d2 import setup_logger
from uda_plugins.engine import UDATrainer
from uda_plugins.engine.setup import load_cfg
from uda_plugins.modeling.mmseg_conversion import convert_mmseg_checkpoint
from uda_plugins.utils.cli import print_error

logger = logging.getLogger("uda_plugins.convert_mmseg_checkpoint")


def convert(config_file: str, source: str, output: str, opts=()) -> dict:
    cfg, _ = load_cfg(config_file, list(opts) + ["MODEL.BACKBONE.PRETRAINED", "", "MODEL.DEVICE", "cpu"])
    model = UDATrainer.build_model(cfg)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"--input '{source}' does not exist")
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)  # mmcv checkpoints hold metadata
    except Exception as e:
        raise OSError(f"--input '{source}' could not be read ({e})") from None
    state, unused = convert_mmseg_checkpoint(checkpoint, model)
    own = model.state_dict()
    missing = [k for k in own if k.startswith("student.") and k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise KeyError(
            f"'{source}' does not fill {len(missing)} student parameters of {config_file}'s network, e.g. "
            f"{missing[:4]}: does the config match the checkpoint?"
        )
    parts = ("student", "teacher", "feature_distance", "guidance")  # guidance: a Guidance Training Guider
    counts = {part: sum(k.startswith(part + ".") for k in state) for part in parts}
    if "teacher" in {n.split(".")[0] for n in own} and counts["teacher"] and "ema_updates" in own:
        state["ema_updates"] = torch.ones(
            (), dtype=torch.long
        )  # a trained teacher: not re-initialised from the student
    logger.info("Converted %s", ", ".join(f"{n} {c} tensors" for n, c in counts.items() if c))
    if unused:
        logger.info("%d checkpoint tensors have no place in this network (e.g. %s)", len(unused), unused[:5])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    torch.save({"model": state}, tmp)
    os.replace(tmp, output)
    return {"counts": counts, "unused": unused}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the config of the checkpoint's network")
    parser.add_argument("--input", required=True, help="the mmseg checkpoint")
    parser.add_argument("--output", required=True, help="the converted checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    setup_logger(name="uda_plugins")
    try:
        convert(args.config_file, args.input, args.output, args.opts)
    except (OSError, ValueError, KeyError) as e:
        return print_error("convert_mmseg_checkpoint.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
