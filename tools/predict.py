#!/usr/bin/env python
"""Run a trained model on your own images or videos (Detectron2's demo, for semantic segmentation).

    python tools/predict.py --config-file <config> --input <files | folders | "globs" | videos> --output <folder> \\
        MODEL.WEIGHTS <checkpoint.pth> [TEST.MODE slide] [KEY VALUE ...]

For every image ``<name>.<ext>`` it writes to ``--output``: ``<name>_seg.png`` (the prediction in the dataset's
palette), ``<name>_overlay.png`` (blended over the image, ``--alpha``) and ``<name>_labels.png`` (the class ids,
one byte per pixel). For every video ``<name>.mp4|avi|mov|mkv`` it writes ``<name>_overlay.mp4``, frame by frame.
Images go to the network ``--batch-size`` at a time, resized by ``INPUT.TEST`` (RESIZE, RESIZE_MODE) as in
evaluation; the prediction is scored back at the input's size. ``TEST.MODE slide`` (with ``TEST.SLIDE_CROP_SIZE``
/ ``STRIDE``) runs sliding windows; ``TEST.EVAL_MODEL teacher`` predicts with the EMA teacher. Class names and
colours come from the metadata of ``DATASETS.TEST[0]`` (the Cityscapes palette for the 19-class sets). Every file
is written atomically.
"""

import argparse
import glob
import logging
import os
import sys
import tempfile
from typing import Iterator, List, Sequence, Tuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

import uda_plugins  # noqa: F401  (registration)
from uda_plugins.d2 import MetadataCatalog, setup_logger
from uda_plugins.data.transforms import GeometryRule, resize_image
from uda_plugins.engine import UDACheckpointer, UDATrainer
from uda_plugins.engine.setup import load_frozen_cfg
from uda_plugins.modeling import predicted_classes
from uda_plugins.utils.cli import print_error
from uda_plugins.utils.file_io import atomic_write_png
from uda_plugins.utils.visualization import palette_for_dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")

logger = logging.getLogger("uda_plugins.predict")


def expand_inputs(items: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(image files, video files) named by ``items``: files, folders (their images and videos, sorted) or glob
    patterns (what they match; other files are skipped). A file given by name must be an image or a video."""
    images, videos = [], []

    def add(path: str, explicit: bool) -> None:
        ext = os.path.splitext(path)[1].lower()
        if ext in IMAGE_EXTENSIONS:
            images.append(path)
        elif ext in VIDEO_EXTENSIONS:
            videos.append(path)
        elif explicit:
            raise ValueError(
                f"--input '{path}' is neither an image ({IMAGE_EXTENSIONS}) nor a video ({VIDEO_EXTENSIONS})"
            )

    for item in items:
        before = len(images) + len(videos)
        if os.path.isfile(item):
            add(item, explicit=True)
        elif os.path.isdir(item) or glob.has_magic(item):
            paths = glob.glob(os.path.join(item, "*")) if os.path.isdir(item) else glob.glob(item)
            for path in sorted(paths):
                if os.path.isfile(path):
                    add(path, explicit=False)
        else:
            raise FileNotFoundError(f"--input '{item}' is not a file, a folder or a glob pattern")
        if len(images) + len(videos) == before:
            raise FileNotFoundError(f"--input '{item}' holds no image or video")
    return images, videos


class Predictor:
    """A trained meta-architecture in evaluation mode: RGB uint8 frames in, class maps at the frames' size out."""

    def __init__(self, cfg) -> None:
        self.model = UDATrainer.build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            if not os.path.isfile(cfg.MODEL.WEIGHTS):
                raise FileNotFoundError(f"MODEL.WEIGHTS file '{cfg.MODEL.WEIGHTS}' does not exist")
            UDACheckpointer(self.model).load(cfg.MODEL.WEIGHTS, checkpointables=[])
        else:
            logger.warning("No MODEL.WEIGHTS: predicting with a randomly initialised model")
        self.model.eval_model = cfg.TEST.EVAL_MODEL if cfg.TEST.EVAL_MODEL != "both" else "student"
        self.model.eval()
        self.resize = GeometryRule.from_config(cfg.INPUT.TEST, "INPUT.TEST")
        self.bgr = cfg.INPUT.FORMAT == "BGR"

    @torch.no_grad()
    def __call__(self, frames_rgb: Sequence[np.ndarray]) -> List[np.ndarray]:
        inputs = []
        for frame in frames_rgb:
            height, width = frame.shape[:2]
            image = frame[:, :, ::-1] if self.bgr else frame
            image = resize_image(image, self.resize.base_size((height, width)))
            tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            inputs.append({"image": tensor, "height": height, "width": width})
        outputs = self.model(inputs)
        return [predicted_classes(o["sem_seg"], dim=0).to(torch.uint8).cpu().numpy() for o in outputs]


def overlay(frame_rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float) -> np.ndarray:
    return (frame_rgb * (1 - alpha) + palette[labels] * alpha).round().astype(np.uint8)


def read_rgb(path: str) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"Cannot read image '{path}' (missing, corrupt or an unsupported format)")
    return image[:, :, ::-1].copy()


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_images(predictor: Predictor, paths: Sequence[str], out_dir: str, palette, alpha: float, batch: int):
    with tqdm(total=len(paths), desc="images", unit="img", disable=None) as bar:
        for chunk in batches(paths, batch):
            frames = [read_rgb(p) for p in chunk]
            for path, frame, labels in zip(chunk, frames, predictor(frames)):
                stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
                atomic_write_png(stem + "_seg.png", palette[labels])
                atomic_write_png(stem + "_overlay.png", overlay(frame, labels, palette, alpha))
                atomic_write_png(stem + "_labels.png", labels)
            bar.update(len(chunk))


def predict_video(predictor: Predictor, path: str, out_dir: str, palette, alpha: float, batch: int) -> str:
    """Write ``<name>_overlay.mp4`` (same size and frame rate); returns its path."""
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"Cannot open video '{path}'")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    target = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_overlay.mp4")
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".mp4", dir=out_dir)
    os.close(fd)
    writer = None
    try:
        with tqdm(total=total, desc=os.path.basename(path), unit="frame", disable=None) as bar:
            while True:
                frames = []
                while len(frames) < batch:
                    ok, frame = capture.read()
                    if not ok:
                        break
                    frames.append(frame[:, :, ::-1].copy())
                if not frames:
                    break
                for frame, labels in zip(frames, predictor(frames)):
                    if writer is None:
                        h, w = frame.shape[:2]
                        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                    writer.write(overlay(frame, labels, palette, alpha)[:, :, ::-1])
                bar.update(len(frames))
        if writer is None:
            raise ValueError(f"Video '{path}' has no frames")
        writer.release()
        os.replace(tmp, target)
    finally:
        capture.release()
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders, globs or videos")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the prediction in the overlays")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS")
    args = parser.parse_args(argv)
    setup_logger(name="uda_plugins")
    try:
        cfg = load_frozen_cfg(args.config_file, args.opts)
        images, videos = expand_inputs(args.input)
        os.makedirs(args.output, exist_ok=True)
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
        palette = palette_for_dataset(dataset, num_classes)
        names = MetadataCatalog.get(dataset).get("stuff_classes") if dataset else None
        logger.info(f"Classes: {', '.join(names) if names else num_classes}")
        predictor = Predictor(cfg)
        if images:
            predict_images(predictor, images, args.output, palette, args.alpha, args.batch_size)
        for video in videos:
            logger.info(f"Wrote {predict_video(predictor, video, args.output, palette, args.alpha, args.batch_size)}")
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        return print_error("predict.py", e)
    logger.info(f"{len(images)} images and {len(videos)} videos -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
