#!/usr/bin/env python
"""Convert a checkpoint of the DUDA release (parquets/DUDA: a warm-up model such as their FDA one, or a trained
student or mean model) into this project's naming, for ``MODEL.WEIGHTS``.

    python tools/convert_duda_checkpoint.py <their .pth> pretrained/duda_warmup.pth
    python tools/train_net.py --config-file configs/gta5_cityscapes/duda_dlv2_r101.yaml \\
        MODEL.WEIGHTS pretrained/duda_warmup.pth UDA.PSEUDO_LABEL_BANK.INITIAL_DIR <their pseudo_label_0.45>

Their ``GeneralSegmentor`` (``models/GeneralSegmentor.py``) holds ``backbone.*`` (the DeepLab-V2 ResNet, with
torchvision's names, which are timm's) and ``decoder.aspp.conv2d_list.<i>.*`` (``ASPP_V2``), saved with a
``module.`` prefix from DDP or AveragedModel (whose ``n_averaged`` is dropped). They become ``student.backbone.model.*``
and ``student.head.aspp.<i>.*``; the configs' ``MODEL.TIMM.STYLE caffe`` is their network, so the weights run as
theirs do (tests/test_caffe_resnet.py). Any other key fails, naming it. The output holds ``{"model": state_dict}``,
written atomically; loading it checks every tensor's shape.
"""

import argparse
import os
import re
import sys
from typing import Dict

import torch

_RENAMES = [
    (re.compile(r"^backbone\.(.+)$"), r"student.backbone.model.\1"),
    (re.compile(r"^decoder\.aspp\.conv2d_list\.(\d+)\.(weight|bias)$"), r"student.head.aspp.\1.\2"),
]


def convert_duda_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name == "n_averaged":
            continue
        for pattern, replacement in _RENAMES:
            if pattern.match(name):
                out[pattern.sub(replacement, name)] = value
                break
        else:
            raise KeyError(f"'{key}' is not a key of DUDA's GeneralSegmentor (backbone.*, decoder.aspp.conv2d_list.*)")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a checkpoint of the DUDA release")
    parser.add_argument("output", help="the converted checkpoint (MODEL.WEIGHTS)")
    args = parser.parse_args(argv)
    try:
        if not os.path.isfile(args.input):
            raise FileNotFoundError(f"'{args.input}' does not exist")
        checkpoint = torch.load(args.input, map_location="cpu", weights_only=True)
        state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
        converted = convert_duda_state_dict(state)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        tmp = args.output + ".tmp"
        torch.save({"model": converted}, tmp)
        os.replace(tmp, args.output)
    except (FileNotFoundError, KeyError, OSError, RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"convert_duda_checkpoint.py: error: {message}", file=sys.stderr)
        return 1
    print(f"{len(converted)} tensors -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
