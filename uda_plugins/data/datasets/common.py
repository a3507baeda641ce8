"""What every dataset module shares: where datasets live, reading images and labels with one-line errors,
and registering a split in Detectron2's catalogs."""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from uda_plugins.d2 import DatasetCatalog, MetadataCatalog
from uda_plugins.data.labels import EVAL_SUBSETS, IGNORE_LABEL, ClassSet

__all__ = [
    "image_label_dicts",
    "raw_label_files",
    "convert_label_files",
    "write_prepared_labels",
    "DATASETS_ROOT_ENV",
    "datasets_root",
    "require_dir",
    "read_image",
    "read_label",
    "read_label_as_grey",
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


def read_label_as_grey(path: str) -> np.ndarray:
    """A label file through PIL's ``convert("L")``: what a release that reads labels with
    ``Image.open(f).convert("L")`` sees (ILM-ASSL's ``img_loader(path, "L")`` on its paste samples). A palette PNG
    (GTA5's raw labels) gives the grey level of each pixel's palette colour, not its index; a 16-bit colour PNG
    (SYNTHIA's) the grey level of its high bytes. Only to reproduce such a release; labels are read with
    :func:`read_label`."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"))
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


def image_label_dicts(
    image_files: Sequence[str],
    label_file_of: Callable[[str], str],
    image_id_of: Callable[[str], str],
    prepare_hint: str,
) -> List[dict]:
    """One Detectron2 dict per image (``file_name``, ``sem_seg_file_name``, ``height``, ``width`` from the image
    header, ``image_id``). An image without its label file fails naming both, and ``prepare_hint`` (the command
    that makes the label files)."""
    dicts = []
    for image_file in image_files:
        label_file = label_file_of(image_file)
        if not os.path.isfile(label_file):
            raise FileNotFoundError(f"Image '{image_file}' has no label file '{label_file}' ({prepare_hint})")
        height, width = image_size(image_file)
        dicts.append(
            {
                "file_name": image_file,
                "sem_seg_file_name": label_file,
                "height": height,
                "width": width,
                "image_id": image_id_of(image_file),
            }
        )
    return dicts


def raw_label_files(image_files: Sequence[str], raw_file_of: Callable[[str], str], hint: str = "") -> List[str]:
    """The raw (as downloaded) label file of every image; a missing one fails naming the image and the file."""
    out = []
    for image_file in image_files:
        raw = raw_file_of(image_file)
        if not os.path.isfile(raw):
            raise FileNotFoundError(f"Image '{image_file}' has no label file '{raw}'" + (f" ({hint})" if hint else ""))
        out.append(raw)
    return out


def convert_label_files(
    pairs: Sequence[tuple],
    convert: Callable[[np.ndarray, str], np.ndarray],
    desc: str,
    skip_existing: bool = True,
    read: Callable[[str], np.ndarray] = read_label,
) -> int:
    """Write ``convert(read(src), src)`` to ``dst`` for every ``(src, dst)`` pair, atomically, with a progress bar.
    Returns the number of files written."""
    from tqdm import tqdm

    from uda_plugins.utils.file_io import atomic_write_png

    written = 0
    for src, dst in tqdm(pairs, desc=desc, unit="file"):
        if skip_existing and os.path.exists(dst):
            continue
        atomic_write_png(dst, convert(read(src), src))
        written += 1
    return written


def write_prepared_labels(
    raw_files: Sequence[str],
    raw_suffix: str,
    luts: Dict[str, np.ndarray],
    desc: str,
    skip_existing: bool = True,
    read: Callable[[str], np.ndarray] = read_label,
    post: Optional[Callable[[np.ndarray, str], np.ndarray]] = None,
) -> int:
    """What every ``tools/prepare_*`` script does: for each prepared suffix -> LUT in ``luts``, map every raw label
    file ``<stem><raw_suffix>`` through the LUT (unknown values fail naming the file), optionally ``post``-process
    it, and write ``<stem><suffix>`` beside it. Returns the number of files written."""
    from uda_plugins.data.labels import apply_lut

    written = 0
    for suffix, lut in luts.items():
        pairs = [(raw, raw[: -len(raw_suffix)] + suffix) for raw in raw_files]

        def convert(label: np.ndarray, src: str, lut: np.ndarray = lut) -> np.ndarray:
            out = apply_lut(label, lut, src)
            return post(out, src) if post is not None else out

        written += convert_label_files(pairs, convert, f"{desc} -> {suffix}", skip_existing=skip_existing, read=read)
    return written
