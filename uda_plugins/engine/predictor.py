"""The trained model as a function from images to class maps, usable from Python (Detectron2's
``DefaultPredictor``): what ``tools/predict.py`` and any script of yours predict with."""

from __future__ import annotations

import logging
from typing import List, Sequence

import numpy as np
import torch

from uda_plugins.d2 import CfgNode
from uda_plugins.data.transforms import GeometryRule, resize_image
from uda_plugins.modeling import predicted_classes

from .checkpoint import load_evaluated_weights
from .trainer import UDATrainer

__all__ = ["Predictor"]

logger = logging.getLogger(__name__)


class Predictor:
    """A trained meta-architecture in evaluation mode: RGB uint8 frames (H, W, 3) in, class maps (uint8, at each
    frame's size) out.

    The network is ``TEST.EVAL_MODEL`` ("both" predicts with the student), its weights every tensor of it from
    ``MODEL.WEIGHTS`` (:func:`~uda_plugins.engine.checkpoint.load_evaluated_weights`). Frames are resized as
    evaluation resizes them (``INPUT.TEST``: RESIZE, RESIZE_MODE), predicted whole or with sliding windows
    (``TEST.MODE``), and the logits brought back to the frame's size. Frames are RGB whatever ``INPUT.FORMAT`` says:
    the network's input order is applied where every other path applies it, in ``Segmentor.normalize``.

        predictor = Predictor(cfg)
        labels = predictor([rgb_frame])[0]
    """

    def __init__(self, cfg: CfgNode) -> None:
        self.model = UDATrainer.build_model(cfg)
        self.model.eval_model = cfg.TEST.EVAL_MODEL if cfg.TEST.EVAL_MODEL != "both" else "student"
        if cfg.MODEL.WEIGHTS:
            load_evaluated_weights(self.model, cfg.MODEL.WEIGHTS, self.model.eval_model)
        else:
            logger.warning("No MODEL.WEIGHTS: predicting with a randomly initialised model")
        self.model.eval()
        self.resize = GeometryRule.from_config(cfg.INPUT.TEST, "INPUT.TEST")

    @torch.no_grad()
    def __call__(self, frames_rgb: Sequence[np.ndarray]) -> List[np.ndarray]:
        inputs = []
        for frame in frames_rgb:
            height, width = frame.shape[:2]
            image = resize_image(frame, self.resize.base_size((height, width)), self.resize.interpolation)
            tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            inputs.append({"image": tensor, "height": height, "width": width})
        outputs = self.model(inputs)
        return [predicted_classes(o["sem_seg"], dim=0).to(torch.uint8).cpu().numpy() for o in outputs]
