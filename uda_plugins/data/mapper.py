"""Dataset dict -> model input dict, for training (random geometry, recorded) and testing (fixed resize).

Output keys (Detectron2's): ``image`` (CHW uint8 RGB tensor), ``sem_seg`` (HW long tensor, only where labels are
loaded), ``height``/``width`` (the original size: predictions are scored at it), plus ``file_name``,
``image_id`` and ``geometry`` (the applied :class:`~uda_plugins.data.transforms.Geometry` as plain data).

Every input is checked and fails with one line naming the file: missing or corrupt image, image size different
from the dict's, label size different from the image's, label values outside the class table.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from uda_plugins.d2 import CfgNode

from .datasets.common import read_image, read_label
from .labels import IGNORE_LABEL, LABEL_MAPS, apply_lut, check_label_values
from .transforms import Geometry, GeometryRule, apply_geometry, resize_image, resize_label

__all__ = ["UDADatasetMapper", "crop_pad_image"]


def crop_pad_image(cfg: CfgNode, node: CfgNode) -> tuple:
    """The 0..255 RGB value that padded crop pixels get: ``node.CROP_PAD_IMAGE`` (in INPUT.FORMAT's order, as
    MODEL.PIXEL_MEAN), or for () the pixel mean, i.e. 0 after normalisation (mmseg's ``Pad`` and ILM-ASSL's ``Crop``
    pad the normalised image with 0) up to the uint8 rounding (at most 0.5 / PIXEL_STD)."""
    values = tuple(node.get("CROP_PAD_IMAGE", ())) or tuple(cfg.MODEL.PIXEL_MEAN)
    if len(values) != len(cfg.MODEL.PIXEL_MEAN):
        raise ValueError(f"CROP_PAD_IMAGE {list(values)} needs one value per channel ({len(cfg.MODEL.PIXEL_MEAN)})")
    values = values[::-1] if cfg.INPUT.FORMAT == "BGR" else values  # images are RGB until the network
    return tuple(int(min(max(round(float(v)), 0), 255)) for v in values)


EVAL_RESOLUTIONS = ("label", "input")


class UDADatasetMapper:
    """Reads, checks and transforms one dataset dict.

    Args:
        is_train: random geometry from ``rule``; otherwise a deterministic resize to the rule's base size and the
            label at full size.
        rule: the domain's :class:`~uda_plugins.data.transforms.GeometryRule` (``INPUT.SOURCE``, ``INPUT.TARGET``
            or ``INPUT.TEST``); an ``input_cfg`` node is turned into one.
        num_classes: labels must hold 0..num_classes-1 or the ignore label.
        load_label: read ``sem_seg_file_name`` (unlabelled target images are never read by adaptation methods).
        pad_image, pad_label: what padded crop pixels get (``CROP_PAD``): 0..255 per image channel (the pixel
            mean is 0 after normalisation) and a label value (default: the ignore label).
        class_crop_pixels, class_crop_redraws: rare-class sampling
            (:class:`~uda_plugins.data.samplers.RareClassSampler`): a sample mapped with ``required_class=c``
            re-draws its random geometry up to ``class_crop_redraws`` times until the crop holds more than
            ``class_crop_pixels`` pixels of ``c`` (``DATALOADER.RCS.MIN_PIXELS * MIN_CROP_RATIO`` and
            ``CROP_REDRAWS``; 0 pixels: no re-draw).
        full_view: training samples also carry ``full_image``, the whole image at the rule's base size (without
            the random scale, crop or flip; DUDA's teacher predicts on it; the sample's ``geometry`` maps it to the
            crop).
        label_at_input: test samples also carry ``sem_seg_at_input``, the label resized to the network's input
            size with PIL's NEAREST (``TEST.EVAL_RESOLUTION input``: MCL's val loaders, ``cityscapes_dataset.py
            :192-193``).
        center_crop: (h, w) > 0: a test sample is the centre crop of that size of the image at the rule's base size,
            and of its label resized to that size (nearest) (``TEST.CENTER_CROP``: ILM-ASSL's validation); its
            ``height``/``width`` are the crop's.

    Every mapped dict names its rule's config node under ``"input_config"`` (``INPUT.SOURCE`` ...), so that an
    error about its size can say which keys produced it.
    """

    def __init__(
        self,
        *,
        is_train: bool,
        num_classes: int,
        load_label: bool,
        rule: Optional[GeometryRule] = None,
        input_cfg: Optional[CfgNode] = None,
        ignore_label: int = IGNORE_LABEL,
        pad_image: Sequence[int] = (0, 0, 0),
        pad_label: Optional[int] = None,
        class_crop_pixels: float = 0.0,
        class_crop_redraws: int = 10,
        full_view: bool = False,
        label_at_input: bool = False,
        center_crop: Sequence[int] = (0, 0),
    ) -> None:
        if (rule is None) == (input_cfg is None):
            raise TypeError("UDADatasetMapper takes a rule or an input_cfg")
        self.is_train = is_train
        self.rule = rule if rule is not None else GeometryRule.from_config(input_cfg)
        self.num_classes = num_classes
        self.load_label = load_label
        self.ignore_label = ignore_label
        self.pad_image = np.asarray(pad_image, dtype=np.uint8)
        self.pad_label = ignore_label if pad_label is None or pad_label < 0 else int(pad_label)
        self.class_crop_pixels = float(class_crop_pixels)
        self.class_crop_redraws = int(class_crop_redraws)
        self.full_view = full_view
        self.label_at_input = label_at_input
        self.center_crop = tuple(int(v) for v in center_crop) if min(center_crop, default=0) > 0 else None

    @classmethod
    def from_config(
        cls,
        cfg: CfgNode,
        domain: str,
        load_label: bool,
        full_view: bool = False,
        is_train: Optional[bool] = None,
        class_crop_pixels: Optional[float] = None,
    ) -> "UDADatasetMapper":
        """``domain``: "source", "target" (training geometry, unless ``is_train`` is False: the whole views a
        teacher predicts on) or "test". ``class_crop_pixels``: rare-class crops (default: from DATALOADER.RCS)."""
        if domain not in ("source", "target", "test"):
            raise ValueError(f"Unknown domain '{domain}' (source, target or test)")
        key, node = f"INPUT.{domain.upper()}", cfg.INPUT[domain.upper()]
        if cfg.TEST.EVAL_RESOLUTION not in EVAL_RESOLUTIONS:
            raise ValueError(
                f"TEST.EVAL_RESOLUTION must be one of {EVAL_RESOLUTIONS}, not '{cfg.TEST.EVAL_RESOLUTION}'"
            )
        rcs = cfg.DATALOADER.RCS
        return cls(
            is_train=domain != "test" if is_train is None else is_train,
            rule=GeometryRule.from_config(node, key),
            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            load_label=load_label,
            ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            pad_image=crop_pad_image(cfg, node),
            pad_label=node.get("CROP_PAD_LABEL", -1),
            class_crop_pixels=rcs.MIN_PIXELS * rcs.MIN_CROP_RATIO if class_crop_pixels is None else class_crop_pixels,
            class_crop_redraws=rcs.CROP_REDRAWS,
            full_view=full_view,
            label_at_input=domain == "test" and cfg.TEST.EVAL_RESOLUTION == "input",
            center_crop=tuple(cfg.TEST.CENTER_CROP) if domain == "test" else (0, 0),
        )

    def _read(self, dataset_dict: dict, load_label: bool):
        file_name = dataset_dict["file_name"]
        image = read_image(file_name)
        expected = (dataset_dict.get("height"), dataset_dict.get("width"))
        if expected[0] is not None and tuple(image.shape[:2]) != expected:
            raise ValueError(
                f"Image '{file_name}' is {image.shape[0]}x{image.shape[1]} but its dataset dict says "
                f"{expected[0]}x{expected[1]}"
            )
        label = None
        if load_label:
            label = self.read_label(dataset_dict)
            if label.shape != image.shape[:2]:
                raise ValueError(
                    f"Label '{dataset_dict['sem_seg_file_name']}' is {label.shape[0]}x{label.shape[1]} but its image "
                    f"'{file_name}' is {image.shape[0]}x{image.shape[1]}"
                )
        return image, label

    def read_label(self, dataset_dict: dict) -> np.ndarray:
        """The label of ``dataset_dict`` at its stored resolution, re-mapped and checked (without reading the image:
        a sampler that rejects draws by their label reads only that)."""
        label_file = dataset_dict.get("sem_seg_file_name")
        if label_file is None:
            raise KeyError(
                f"Image '{dataset_dict['file_name']}' has no label ('sem_seg_file_name') but labels were requested"
            )
        label = read_label(label_file)
        if dataset_dict.get("label_map"):  # a dataset variant that re-maps the prepared labels
            label = apply_lut(label, LABEL_MAPS[dataset_dict["label_map"]], label_file)
        check_label_values(label, self.num_classes, label_file, self.ignore_label)
        return label

    def _center_crop(self, image: np.ndarray, label: Optional[np.ndarray], file_name: str):
        """The centre ``center_crop`` of the image at the base size and of its label resized to it; the geometry
        of a test sample of the crop's size (ILM-ASSL ``Crop(crop_type="center")``: offsets ``(h - crop_h) // 2``,
        augmentation.py:255-263)."""
        size = self.rule.base_size(image.shape[:2])
        ch, cw = self.center_crop
        if ch > size[0] or cw > size[1]:
            raise ValueError(f"TEST.CENTER_CROP {[ch, cw]} is larger than '{file_name}' at its test size {list(size)}")
        top, left = (size[0] - ch) // 2, (size[1] - cw) // 2
        image = resize_image(image, size, self.rule.interpolation)[top : top + ch, left : left + cw]
        if label is not None:
            label = resize_label(label, size, self.rule.interpolation) if label.shape != tuple(size) else label
            label = np.ascontiguousarray(label[top : top + ch, left : left + cw])
        return image, label, Geometry((ch, cw), (ch, cw), (0, 0, ch, cw), False)

    def __call__(
        self,
        dataset_dict: dict,
        rng: Optional[np.random.Generator] = None,
        required_class: Optional[int] = None,
        geometry: Optional[Geometry] = None,
    ) -> dict:
        """``rng`` draws the training geometry; the UDA loader passes one seeded by the sample's position, so a
        sample is the same whatever the number of workers or processes, and after a resume. ``required_class``:
        the class rare-class sampling drew this file for; the crop is re-drawn until it holds enough of it (the
        label is read for that even when labels are not returned). ``geometry``: a training geometry drawn before
        (by a sampler that looked at the label), applied instead of a draw."""
        class_crop = self.is_train and required_class is not None and self.class_crop_pixels > 0
        image, label = self._read(dataset_dict, self.load_label or class_crop)
        if self.is_train and geometry is not None:
            if tuple(geometry.orig_size) != tuple(image.shape[:2]):
                raise ValueError(
                    f"A geometry of a {geometry.orig_size[0]}x{geometry.orig_size[1]} image for "
                    f"'{dataset_dict['file_name']}', which is {image.shape[0]}x{image.shape[1]}"
                )
        elif self.is_train:
            rng = rng if rng is not None else np.random.default_rng()
            geometry = self.rule.sample(
                rng,
                image.shape[:2],
                label=label,
                ignore_label=self.ignore_label,
                required_class=required_class if class_crop else None,
                required_pixels=self.class_crop_pixels,
                max_redraws=self.class_crop_redraws,
            )
        if self.is_train:
            if self.full_view:
                full_image = resize_image(image, self.rule.base_size(image.shape[:2]), self.rule.interpolation)
            image = apply_geometry(
                self.rule.stretched(image, False), geometry, False, self.pad_image, self.rule.interpolation
            )
            if not self.load_label:
                label = None  # read only to place the crop
            if label is not None:
                label = apply_geometry(
                    self.rule.stretched(label, True), geometry, True, self.pad_label, self.rule.interpolation
                )
        elif self.center_crop is not None:
            image, label, geometry = self._center_crop(image, label, dataset_dict["file_name"])
        else:
            size = self.rule.base_size(image.shape[:2])
            geometry = Geometry(tuple(image.shape[:2]), size, (0, 0, size[0], size[1]), False)
            image = resize_image(image, size, self.rule.interpolation)  # the label stays at full size: we score there
        out = {
            "file_name": dataset_dict["file_name"],
            "image_id": dataset_dict.get("image_id", dataset_dict["file_name"]),
            "height": int(geometry.orig_size[0]),
            "width": int(geometry.orig_size[1]),
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "geometry": geometry.to_dict(),
            "input_config": self.rule.key,
        }
        if label is not None:
            out["sem_seg"] = torch.from_numpy(label.astype(np.int64))
            if self.label_at_input and not self.is_train:
                at_input = resize_label(label, geometry.resized_size, "pil_bilinear")  # PIL's NEAREST
                out["sem_seg_at_input"] = torch.from_numpy(at_input.astype(np.int64))
        if self.is_train and self.full_view:
            out["full_image"] = torch.from_numpy(np.ascontiguousarray(full_image.transpose(2, 0, 1)))
        return out
