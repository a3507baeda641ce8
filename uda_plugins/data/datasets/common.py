"""What every dataset module shares: where datasets live, reading images and labels with one-line errors,
and registering a split in Detectron2's catalogs."""
from __future__ import annotations

import os
from typing import Callable, List, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from uda_plugins.d2 import DatasetCatalog, MetadataCatalog
from uda_plugins.data.labels import EVAL_SUBSETS, IGNORE_LABEL, ClassSet

__all__ = [
    "DATASETS_ROOT_ENV",
    "datasets_root",
    "require_dir",
    "read_image",
    "read_label",
    "image_size",
    "register_sem_seg",
]

DATASETS_ROOT_ENV = "UDA_DATASETS"


def datasets_root() -> str:
    """``$UDA_DATASETS``, else ``$DETECTRON2_DATASETS``, else ``./datasets``."""
    return os.environ.get(DATASETS_ROOT_ENV) or os.environ.get("DETECTRON2_DATASETS") or "datasets"


def require_dir(path: str, what: str) -> str:
    """Return ``path`` if it is a directory, else fail with a message that says what is missing and what to do."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{what} folder '{path}' does not exist. Set ${DATASETS_ROOT_ENV} to the folder holding your datasets "
            f"(now '{datasets_root()}') and see datasets/README.md for the expected layout."
        )
    return path


def read_image(path: str) -> np.ndarray:
    """An RGB uint8 HxWx3 array; a missing or unreadable file fails naming the file."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise OSError(f"Image file '{path}' is corrupt or not an image ({e})") from None


def read_label(path: str) -> np.ndarray:
    """The raw values of a label image, never through a colour conversion: palette PNGs give their indices,
    L / I;16 PNGs their values. A missing or corrupt file fails naming the file."""
    try:
        with Image.open(path) as img:
            if img.mode in ("RGB", "RGBA"):
                raise ValueError(
                    f"Label file '{path}' is an {img.mode} colour image; labels must be single-channel class ids "
                    f"(run the dataset's tools/prepare_* script)"
                )
            return np.asarray(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"Label file '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise OSError(f"Label file '{path}' is corrupt or not an image ({e})") from None


def image_size(path: str) -> tuple:
    """(height, width) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise OSError(f"Image file '{path}' is corrupt or not an image ({e})") from None
    return height, width


def register_sem_seg(
    name: str,
    loader: Callable[[], List[dict]],
    class_set: ClassSet,
    *,
    eval_subsets: Sequence[str] = (),
    **extra_metadata,
) -> None:
    """Register a semantic-segmentation split: ``loader`` lists its dicts (called lazily, on every
    ``DatasetCatalog.get``), and its metadata says which classes its labels index.

    Metadata set: ``stuff_classes``, ``stuff_colors``, ``ignore_label``, ``evaluator_type="sem_seg"``,
    ``class_set`` (name), ``eval_subsets`` ({subset name: class indices}) and ``extra_metadata``.
    """
    unknown = [s for s in eval_subsets if s not in EVAL_SUBSETS]
    if unknown:
        raise KeyError(f"Unknown evaluation subsets {unknown}; known: {sorted(EVAL_SUBSETS)}")
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(
        stuff_classes=list(class_set.classes),
        stuff_colors=[list(c) for c in class_set.colors],
        ignore_label=IGNORE_LABEL,
        evaluator_type="sem_seg",
        class_set=class_set.name,
        eval_subsets={s: list(EVAL_SUBSETS[s]) for s in eval_subsets},
        **extra_metadata,
    )


def convert_label_files(
    pairs: Sequence[tuple], convert: Callable[[np.ndarray, str], np.ndarray], desc: str, skip_existing: bool = True
) -> int:
    """Write ``convert(read_label(src), src)`` to ``dst`` for every ``(src, dst)`` pair, atomically, with a
    progress bar. Returns the number of files written. Used by every ``tools/prepare_*`` script."""
    from tqdm import tqdm

    from uda_plugins.utils.file_io import atomic_write_png

    written = 0
    for src, dst in tqdm(pairs, desc=desc, unit="file"):
        if skip_existing and os.path.exists(dst):
            continue
        atomic_write_png(dst, convert(read_label(src), src))
        written += 1
    return written
