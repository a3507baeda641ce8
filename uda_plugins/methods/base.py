"""What every UDA meta-architecture shares.

A meta-architecture is an ``nn.Module`` registered in ``META_ARCH_REGISTRY`` that owns the ``student``
:class:`~uda_plugins.modeling.Segmentor` (and, for self-training methods, a frozen ``teacher`` and method-only
modules). In training mode it is called once per iteration with the UDA batch
``{"source": [...], "target": [[...], ...]}`` and returns a flat ``{"loss_*": tensor}`` dict with every weight
applied; in eval mode it behaves like Detectron2's ``SemanticSegmentor``: a list of input dicts in,
``[{"sem_seg": logits (C, height, width)}]`` out, computed by the network named in ``eval_model``.

Subclasses implement :meth:`forward_train` and declare what data they read in ``data_requirements``. The base
class also owns the method-independent DAFormer strategy that acts on the source loss: the thing-class ImageNet
feature distance (``UDA.FD.LAMBDA`` > 0), so every method (source-only included) can switch it on.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from uda_plugins.d2 import CfgNode, comm, get_event_storage, has_event_storage
from uda_plugins.data.build import DataRequirements
from uda_plugins.modeling import SegmentorOutput, build_segmentor, predicted_classes, segment, stack_images
from uda_plugins.utils.profiling import timed
from uda_plugins.utils.visualization import colorize, palette_for_dataset, panel

from .feature_distance import FeatureDistance

__all__ = ["UDAMetaArch"]


class UDAMetaArch(nn.Module):
    data_requirements: DataRequirements = DataRequirements()

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__()
        self.student = self.build_student(cfg)
        self.ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        self.test_mode = cfg.TEST.MODE
        self.slide_crop = tuple(cfg.TEST.SLIDE_CROP_SIZE)
        self.slide_stride = tuple(cfg.TEST.SLIDE_STRIDE)
        self.slide_batch = cfg.TEST.SLIDE_BATCH_SIZE
        self.vis_period = cfg.VIS_PERIOD
        # False on the 2nd, 3rd ... micro-batch of a step with gradient accumulation: one set of pictures per step.
        self.first_micro_batch = True
        self.eval_model = "student"
        source = cfg.DATASETS.SOURCE_TRAIN[0] if cfg.DATASETS.SOURCE_TRAIN else None
        self._palette = palette_for_dataset(source, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        fd = cfg.UDA.FD
        self.feature_distance: Optional[FeatureDistance] = None
        if fd.LAMBDA > 0:
            # A copy of the encoder as initialised (ImageNet weights from MODEL.BACKBONE.PRETRAINED).
            self.feature_distance = FeatureDistance(
                self.student.backbone,
                fd.LAMBDA,
                fd.CLASSES,
                fd.SCALE_MIN_RATIO,
                fd.FEATURE,
                cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
                self.ignore_value,
            )

    def build_student(self, cfg: CfgNode) -> nn.Module:
        """The network this method trains (``MODEL.*``); a method with several heads builds its own."""
        return build_segmentor(cfg)

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
    def source_losses(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> Tuple[Dict[str, torch.Tensor], SegmentorOutput]:
        """The supervised source loss (``loss_source``) and, when enabled, the feature distance
        (``loss_feature_distance``) on the same forward, as DAFormer; returns the losses and the forward output."""
        with timed("student_forward"):
            out = self.student.forward_train(images)
            losses = {"loss_source": self.student.loss(out, labels)}
            if self.feature_distance is not None:
                scale = self.student.feature_scale
                fd_images = images
                if scale != 1.0:
                    fd_images = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
                feature = out.features[self.feature_distance.feature]
                losses["loss_feature_distance"] = self.feature_distance(fd_images, labels, feature)
        return losses, out

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
            and self.first_micro_batch
            and comm.is_main_process()
            and has_event_storage()
            and get_event_storage().iter % self.vis_period == 0
        )

    @torch.no_grad()
    def visualize(self, name: str, images: torch.Tensor, labels: Optional[torch.Tensor], logits: torch.Tensor) -> None:
        """Put ``name`` = [input | ground truth | prediction] of the first image into the event storage."""
        self.visualize_panel(name, [images, labels, logits])

    @torch.no_grad()
    def visualize_panel(self, name: str, parts: Sequence[Optional[torch.Tensor]]) -> None:
        """Put a side-by-side picture of the first batch element of each part into the event storage. A part is
        a normalised image batch (N, 3, H, W), logits (N, C, h, w) with C != 3 (shown as the argmax), a label
        batch (N, H, W) of integers (coloured with the palette) or a float map batch (N, H, W) in [0, 1] (grey);
        None parts are skipped."""
        size = None
        pictures = []
        for part in parts:
            if part is None:
                continue
            x = part[0].detach()
            if x.dim() == 3 and x.shape[0] == 3:
                picture = self.student.denormalize(x[None].float())[0].clamp(0, 255).to(torch.uint8)
            elif x.dim() == 3:
                picture = colorize(predicted_classes(x, dim=0), self._palette)
            elif torch.is_floating_point(x):
                picture = (x.clamp(0, 1) * 255).to(torch.uint8)[None].expand(3, -1, -1)
            else:
                picture = colorize(x, self._palette)
            size = size or tuple(picture.shape[-2:])
            if tuple(picture.shape[-2:]) != size:
                picture = F.interpolate(picture[None].float(), size=size, mode="nearest")[0].to(torch.uint8)
            pictures.append(picture)
        get_event_storage().put_image(name, panel(pictures))
