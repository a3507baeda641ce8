"""What every UDA meta-architecture shares.

A meta-architecture is an ``nn.Module`` registered in ``META_ARCH_REGISTRY`` that owns the ``student``
:class:`~uda_plugins.modeling.Segmentor` (and, for self-training methods, a frozen ``teacher`` and method-only
modules). In training mode it is called once per iteration with the UDA batch
``{"source": [...], "target": [[...], ...]}`` and returns a flat ``{"loss_*": tensor}`` dict with every weight
applied; in eval mode it behaves like Detectron2's ``SemanticSegmentor``: a list of input dicts in,
``[{"sem_seg": logits (C, height, width)}]`` out, computed by the network named in ``eval_model``.

Subclasses implement :meth:`forward_train` and declare what data they read in ``data_requirements``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from uda_plugins.d2 import CfgNode, comm, get_event_storage, has_event_storage
from uda_plugins.data.build import DataRequirements
from uda_plugins.modeling import Segmentor, segment, stack_images
from uda_plugins.utils.visualization import colorize, palette_for_dataset, panel

__all__ = ["UDAMetaArch"]


class UDAMetaArch(nn.Module):
    data_requirements: DataRequirements = DataRequirements()

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__()
        self.student = Segmentor(cfg)
        self.ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        self.test_mode = cfg.TEST.MODE
        self.slide_crop = tuple(cfg.TEST.SLIDE_CROP_SIZE)
        self.slide_stride = tuple(cfg.TEST.SLIDE_STRIDE)
        self.slide_batch = cfg.TEST.SLIDE_BATCH_SIZE
        self.vis_period = cfg.VIS_PERIOD
        self.eval_model = "student"
        source = cfg.DATASETS.SOURCE_TRAIN[0] if cfg.DATASETS.SOURCE_TRAIN else None
        self._palette = palette_for_dataset(source, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)

    @property
    def device(self) -> torch.device:
        return self.student.device

    def evaluable_models(self) -> Dict[str, nn.Module]:
        """The networks ``TEST.EVAL_MODEL`` may name."""
        return {"student": self.student}

    def forward(self, batch):
        if self.training:
            return self.forward_train(batch)
        return self.inference(batch)

    def forward_train(self, batch: Dict[str, list]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def inference(self, batched_inputs: List[dict]) -> List[Dict[str, torch.Tensor]]:
        models = self.evaluable_models()
        if self.eval_model not in models:
            raise KeyError(f"TEST.EVAL_MODEL '{self.eval_model}': this method has only {sorted(models)}")
        return segment(
            models[self.eval_model],
            batched_inputs,
            self.test_mode,
            self.slide_crop,
            self.slide_stride,
            self.slide_batch,
        )

    # -------------------------------------------------------------------------------------------- helpers
    def images_and_labels(self, dicts: List[dict]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Normalised (N, 3, H, W) images and (N, H, W) labels (None if the dicts carry none) on the device."""
        images = self.student.normalize(stack_images(dicts, self.device))
        labels = None
        if "sem_seg" in dicts[0]:
            labels = torch.stack([d["sem_seg"] for d in dicts]).to(self.device, non_blocking=True)
        return images, labels

    def should_visualize(self) -> bool:
        return (
            self.vis_period > 0
            and comm.is_main_process()
            and has_event_storage()
            and get_event_storage().iter % self.vis_period == 0
        )

    @torch.no_grad()
    def visualize(self, name: str, images: torch.Tensor, labels: Optional[torch.Tensor], logits: torch.Tensor) -> None:
        """Put ``name`` = [input | ground truth | prediction] of the first image into the event storage."""
        image = self.student.denormalize(images[:1])[0].clamp(0, 255).to(torch.uint8)
        pred = logits[:1].argmax(1)[0]
        pred = torch.nn.functional.interpolate(pred[None, None].float(), size=image.shape[-2:], mode="nearest")[0, 0]
        parts = [image]
        if labels is not None:
            parts.append(colorize(labels[0], self._palette))
        parts.append(colorize(pred, self._palette))
        get_event_storage().put_image(name, panel(parts))
