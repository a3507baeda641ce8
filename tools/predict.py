#!/usr/bin/env python
"""Run a trained model on your own images or videos (Detectron2's demo, for semantic segmentation).

    python tools/predict.py --config-file <config> --input <files | folders | "globs" | videos> --output <folder> \\
        MODEL.WEIGHTS <checkpoint.pth> [TEST.MODE slide] [KEY VALUE ...]

For every image ``<name>.<ext>`` it writes to ``--output``: ``<name>_seg.png`` (the prediction in the dataset's
palette), ``<name>_overlay.png`` (blended over the image, ``--alpha``) and ``<name>_labels.png`` (the class ids,
one byte per pixel). For every video ``<name>.mp4|avi|mov|mkv`` it writes ``<name>_overlay.mp4``, frame by frame.
A folder is searched with its sub-folders (a Cityscapes-layout ``leftImg8bit/val`` through its cities), which are
mirrored under ``--output``. The weights must fit the network predicted with (``TEST.EVAL_MODEL``) entirely, and
``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` the config's datasets: otherwise one line says what does not.
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
from tqdm import tqdm

import uda_plugins  # noqa: F401  (registration)
from uda_plugins.d2 import MetadataCatalog, setup_logger
from uda_plugins.engine.predictor import Predictor
from uda_plugins.engine.preflight import check_class_counts
from uda_plugins.engine.setup import load_frozen_cfg
from uda_plugins.utils.cli import print_error
from uda_plugins.utils.file_io import atomic_write_png
from uda_plugins.utils.visualization import palette_for_dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")

logger = logging.getLogger("uda_plugins.predict")


def expand_inputs(items: Sequence[str]) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """(images, videos) named by ``items``, each as (file, output name): files (named by their file name), folders
    (every image and video in them and their sub-folders, sorted, named by their path inside the folder, so that a
    Cityscapes-layout ``leftImg8bit/val`` is found through its city folders and mirrored under ``--output``) or glob
    patterns (what they match, named by their file name; other files are skipped). A file given by name must be an
    image or a video. Two inputs with one output name fail, naming both."""
    images: List[Tuple[str, str]] = []
    videos: List[Tuple[str, str]] = []
    owner: dict = {}

    def add(path: str, name: str, explicit: bool) -> None:
        ext = os.path.splitext(path)[1].lower()
        kind = images if ext in IMAGE_EXTENSIONS else videos if ext in VIDEO_EXTENSIONS else None
        if kind is None:
            if explicit:
                raise ValueError(
                    f"--input '{path}' is neither an image ({IMAGE_EXTENSIONS}) nor a video ({VIDEO_EXTENSIONS})"
                )
            return
        stem = os.path.splitext(name)[0]
        if stem in owner and owner[stem] != path:
            raise ValueError(f"--input '{owner[stem]}' and '{path}' would both be written as '{stem}_*' under --output")
        owner[stem] = path
        kind.append((path, stem))

    for item in items:
        before = len(images) + len(videos)
        if os.path.isfile(item):
            add(item, os.path.basename(item), explicit=True)
        elif os.path.isdir(item):
            for folder, subfolders, files in os.walk(item):
                subfolders.sort()
                for f in sorted(files):
                    path = os.path.join(folder, f)
                    add(path, os.path.relpath(path, item), explicit=False)
        elif glob.has_magic(item):
            for path in sorted(glob.glob(item)):
                if os.path.isfile(path):
                    add(path, os.path.basename(path), explicit=False)
        else:
            raise FileNotFoundError(f"--input '{item}' is not a file, a folder or a glob pattern")
        if len(images) + len(videos) == before:
            raise FileNotFoundError(f"--input '{item}' holds no image or video, in it or in its sub-folders")
    return images, videos


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


def predict_images(predictor: Predictor, items: Sequence[Tuple[str, str]], out_dir: str, palette, alpha, batch: int):
    """Write the predictions of each (image, output name) of ``items`` under ``out_dir`` (sub-folders as named)."""
    with tqdm(total=len(items), desc="images", unit="img", disable=None) as bar:
        for chunk in batches(items, batch):
            frames = [read_rgb(path) for path, _ in chunk]
            for (_, name), frame, labels in zip(chunk, frames, predictor(frames)):
                stem = os.path.join(out_dir, name)
                os.makedirs(os.path.dirname(stem), exist_ok=True)
                atomic_write_png(stem + "_seg.png", palette[labels])
                atomic_write_png(stem + "_overlay.png", overlay(frame, labels, palette, alpha))
                atomic_write_png(stem + "_labels.png", labels)
            bar.update(len(chunk))


def predict_video(predictor: Predictor, path: str, name: str, out_dir: str, palette, alpha: float, batch: int) -> str:
    """Write ``<out_dir>/<name>_overlay.mp4`` (same size and frame rate); returns its path."""
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"Cannot open video '{path}'")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    target = os.path.join(out_dir, name + "_overlay.mp4")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".mp4", dir=os.path.dirname(target))
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
        check_class_counts(cfg)
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
        for video, name in videos:
            written = predict_video(predictor, video, name, args.output, palette, args.alpha, args.batch_size)
            logger.info(f"Wrote {written}")
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        return print_error("predict.py", e)
    logger.info(f"{len(images)} images and {len(videos)} videos -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
