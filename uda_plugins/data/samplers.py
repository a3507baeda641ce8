"""Samplers as functions of a position, so that data order needs no state to resume.

A training stream is an infinite sequence of *global sample positions* 0, 1, 2, ... Iteration ``i`` of a domain
with global batch ``G`` consumes positions ``i*G .. i*G+G-1``; rank ``r`` of ``R`` takes positions
``i*G + j*R + r``. :class:`EpochPermutationSampler` maps a position to a dataset index (a fresh permutation per
epoch, seeded by (seed, epoch)), and the augmentation RNG of a sample is seeded by its position too. Hence:

* the samples of an iteration do not depend on the number of processes or data workers;
* ``--resume`` at iteration ``i`` continues the exact stream by starting at position ``i*G``.

:class:`RareClassSampler` replaces the permutation for a source stream with DAFormer's rare-class sampling (or, for
UDASS's rare-class pasting, with an explicit class list); it draws from the sample's own position-seeded RNG, so it
keeps all of the above. :class:`SharedClassObjectSampler` is UDASS's pasting as released: classes drawn once per
iteration (from an RNG seeded by the iteration) and shared, then per sample an image and a crop from its own RNG.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .transforms import Geometry, GeometryRule, class_pixels_in_crop

__all__ = [
    "EpochPermutationSampler",
    "InferenceSampler",
    "RareClassSampler",
    "SharedClassObjectSampler",
    "rcs_class_probs",
    "listed_class_probs",
    "rank_positions",
]

logger = logging.getLogger(__name__)


class EpochPermutationSampler:
    """Position ``p`` -> dataset index: element ``p % N`` of a random permutation of ``range(N)`` drawn for
    epoch ``p // N`` from ``torch.Generator().manual_seed(seed + epoch)``; without shuffling, ``p % N``."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        if size <= 0:
            raise ValueError("Cannot sample from an empty dataset")
        self.size = size
        self.seed = int(seed)
        self.shuffle = shuffle
        self._epoch = -1
        self._perm: List[int] = []

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.size, generator=g).tolist()
            self._epoch = epoch
        return self._perm[offset]


def rcs_class_probs(class_pixels: Sequence[float], temperature: float) -> Tuple[np.ndarray, np.ndarray]:
    """DAFormer's class distribution (lhoyer/MIC ``seg/mmseg/datasets/uda_dataset.py``, ``get_rcs_class_probs``
    and ``calculate_frequencies``): over the classes that have any pixel, ``f_c = n_c / sum(n)`` and
    ``P(c) = softmax((1 - f_c) / temperature)``. Returns (those class ids ascending, their probabilities)."""
    if temperature <= 0:
        raise ValueError(f"The rare-class sampling temperature must be > 0, not {temperature}")
    pixels = np.asarray(class_pixels, dtype=np.float64)
    classes = np.flatnonzero(pixels > 0)  # the reference's stats only list classes that occur
    if len(classes) == 0:
        raise ValueError("Rare-class sampling: the source labels hold no pixel of any class")
    logits = (1.0 - pixels[classes] / pixels.sum()) / temperature
    probs = np.exp(logits - logits.max())  # shifted for stability; softmax is shift-invariant
    return classes, probs / probs.sum()


def listed_class_probs(class_list: Sequence[int], num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """An explicit class distribution: ``P(c)`` = the multiplicity of ``c`` in ``class_list`` / its length (UDASS's
    rare-class lists, where SYNTHIA repeats classes to weight them). Returns (the listed class ids ascending, their
    probabilities); an id outside ``0..num_classes-1`` fails."""
    listed = np.asarray(list(class_list), dtype=np.int64)
    if listed.size == 0:
        raise ValueError("The class list of a rare-class sampler is empty")
    bad = listed[(listed < 0) | (listed >= num_classes)]
    if bad.size:
        raise ValueError(f"Class ids {sorted(set(bad.tolist()))} of the class list are not in 0..{num_classes - 1}")
    classes, counts = np.unique(listed, return_counts=True)
    return classes, counts / counts.sum()


class RareClassSampler:
    """DAFormer's rare-class sampling (lhoyer/MIC ``seg/mmseg/datasets/uda_dataset.py``, ``UDADataset`` and
    ``get_rare_class_sample``): draw a class ``c`` with :func:`rcs_class_probs`, then uniformly one image whose
    label holds more than ``min_pixels`` pixels of ``c``.

    Args:
        pixels: (num_images, num_classes) class pixel counts per image (:mod:`uda_plugins.data.class_stats`), rows
            in the order of the stream's dataset.
        temperature, min_pixels: ``DATALOADER.RCS.TEMPERATURE`` / ``MIN_PIXELS`` (0.01 / 3000 in DAFormer).
        class_list: instead of DAFormer's distribution, draw ``c`` with :func:`listed_class_probs` (P(c) proportional
            to its multiplicity in the list; ``temperature`` is then unused) — UDASS's rare-class pasting
            (``UDA.QUADMIX.RARE_CLASSES``).

    The frequencies ``f_c`` are over all images. A class that occurs (or is listed) but where no image has more
    than ``min_pixels`` of it is not drawn (the reference asserts instead); the remaining probabilities are
    renormalised over the remaining classes, and a warning names the dropped ones.

    Attributes:
        class_probs: (num_classes,) float64, P(c); 0 for classes never drawn.
        classes: the class ids that can be drawn, ascending.
    """

    def __init__(
        self,
        pixels: np.ndarray,
        temperature: float,
        min_pixels: float,
        class_names: Optional[Sequence[str]] = None,
        class_list: Optional[Sequence[int]] = None,
    ) -> None:
        pixels = np.asarray(pixels)
        if pixels.ndim != 2 or pixels.shape[0] == 0:
            raise ValueError(f"Rare-class sampling needs (num_images, num_classes) pixel counts, got {pixels.shape}")
        num_classes = pixels.shape[1]
        self.class_names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
        if class_list is None:
            candidates, probs = rcs_class_probs(pixels.sum(axis=0), temperature)
        else:
            candidates, probs = listed_class_probs(class_list, num_classes)
        self._images: List[np.ndarray] = [np.zeros(0, dtype=np.int64)] * num_classes
        keep = []
        for c in candidates:
            self._images[c] = np.flatnonzero(pixels[:, c] > min_pixels)
            keep.append(len(self._images[c]) > 0)
        keep = np.asarray(keep, dtype=bool)
        if not keep.any():
            key = "DATALOADER.RCS.MIN_PIXELS" if class_list is None else "UDA.QUADMIX.RARE_MIN_PIXELS"
            raise ValueError(
                f"Rare-class sampling: no source image has more than {min_pixels} pixels of any "
                f"{'listed ' if class_list is not None else ''}class (lower {key})"
            )
        if not keep.all():
            logger.warning(
                "Rare-class sampling: no source image has more than %s pixels of %s; these classes are not drawn",
                min_pixels,
                ", ".join(self.class_names[c] for c in candidates[~keep]),
            )
        self.classes = candidates[keep]
        self.class_probs = np.zeros(num_classes, dtype=np.float64)
        self.class_probs[self.classes] = probs[keep] / probs[keep].sum()
        self.num_images = pixels.shape[0]
        self.temperature = float(temperature)
        self.min_pixels = min_pixels

    def images_with_class(self, class_id: int) -> np.ndarray:
        """The dataset indices an image is drawn from after drawing ``class_id``."""
        return self._images[class_id]

    def sample(self, rng: np.random.Generator) -> Tuple[int, int]:
        """(dataset index, class id) for one sample; ``rng`` is the sample's position-seeded generator."""
        class_id = int(rng.choice(len(self.class_probs), p=self.class_probs))
        images = self._images[class_id]
        return int(images[rng.integers(len(images))]), class_id

    def describe(self) -> str:
        """One line per drawable class: name, probability and the number of eligible images (for the log)."""
        return "\n".join(
            f"  {self.class_names[c]:<16s} P={self.class_probs[c]:.4f}  images={len(self._images[c])}"
            for c in self.classes
        )


# UDASS's rand_mixer draws images until a crop holds its class, without end; a bound turns a class that no crop can
# hold into an error instead of a hang (the eligible images hold enough pixels for some crop, so it is never reached
# on real data unless almost every crop misses).
RELEASED_OBJECT_MAX_DRAWS = 1000


class SharedClassObjectSampler:
    """UDASS's rare objects as released (ZHE-SAPI/UDASS ``image_udass/seg/mmseg/models/uda/ok/dacs_gta.py``:
    ``rand_mixer.mix`` :192-230 and the phase-B step :695-698; ``dacs_syn.py`` :205-260, :734-738 with SYNTHIA's
    list and threshold):

    * per iteration, ``random.sample(class_list, slots)``: ``slots`` distinct *entries* of the list in order (a class
      listed twice can be drawn twice), shared by every quad image: object ``p`` of each has the ``p``-th class
      (:meth:`iteration_classes`);
    * per object, an image drawn uniformly from those holding the class (the release's ``*_ids2path.json``), the
      geometry ``rule`` (the release: stretched to 2048x1024, a random 1024x1024 crop, no flip), and a *new* image
      drawn until the crop holds more than ``min_pixels`` pixels of the class (:meth:`draw`).

    An image whose label holds too few pixels of a class for any crop to pass is left out of that class's draw: with
    nearest resampling a stored pixel becomes at most ceil(RH/h) x ceil(RW/w) pixels of the (RH, RW) resized label,
    so the release would always reject it, and leaving it out changes no accepted draw (it only saves reading it). A
    listed class no image can give is dropped from the list with a warning (the release would loop for ever).

    Args:
        pixels: (num_images, num_classes) class pixel counts of the labels at their stored resolution.
        sizes: the stored (h, w) of each image, or None where unknown (then every image with a pixel is eligible).
        class_list: ``UDA.QUADMIX.RARE_CLASSES``; slots: ``PASTE_PER_IMAGE``.
        rule: the geometry of an object; min_pixels: ``RARE_MIN_PIXELS``.
    """

    def __init__(
        self,
        pixels: np.ndarray,
        sizes: Sequence[Optional[Tuple[int, int]]],
        class_list: Sequence[int],
        slots: int,
        rule: GeometryRule,
        min_pixels: float,
        class_names: Optional[Sequence[str]] = None,
    ) -> None:
        pixels = np.asarray(pixels)
        if pixels.ndim != 2 or pixels.shape[0] != len(sizes):
            raise ValueError(f"Pixel counts {pixels.shape} for {len(sizes)} image sizes")
        num_classes = pixels.shape[1]
        names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
        listed_class_probs(class_list, num_classes)  # checks the ids
        growth = np.array([self._growth(rule, size) for size in sizes], dtype=np.float64)
        self._images = {}
        for c in sorted(set(int(c) for c in class_list)):
            counts = pixels[:, c].astype(np.float64)
            self._images[c] = np.flatnonzero((counts > 0) & (counts * growth > min_pixels))
        dropped = sorted(c for c, images in self._images.items() if len(images) == 0)
        if dropped:
            logger.warning(
                "QuadMix rare objects as released: no source image can give a crop with more than %s pixels of %s; "
                "these classes are dropped from the list",
                min_pixels,
                ", ".join(names[c] for c in dropped),
            )
        self.entries = np.array([int(c) for c in class_list if int(c) not in dropped], dtype=np.int64)
        if slots < 1 or len(self.entries) < slots:
            raise ValueError(
                f"QuadMix rare objects as released draw {slots} distinct entries of UDA.QUADMIX.RARE_CLASSES per "
                f"iteration, and {len(self.entries)} entries can be drawn (UDA.QUADMIX.PASTE_PER_IMAGE)"
            )
        self.slots = int(slots)
        self.rule = rule
        self.min_pixels = float(min_pixels)
        self.num_images = pixels.shape[0]

    @staticmethod
    def _growth(rule: GeometryRule, size: Optional[Tuple[int, int]]) -> float:
        """The most pixels of the resized label one stored pixel can become (nearest resampling)."""
        if not size or not size[0] or not size[1]:
            return float("inf")
        rh, rw = rule.scaled_size(size, rule.ratio_range[1])
        return float(np.ceil(rh / size[0]) * np.ceil(rw / size[1]))

    def images_with_class(self, class_id: int) -> np.ndarray:
        """The dataset indices an object of ``class_id`` is drawn from."""
        return self._images[class_id]

    def iteration_classes(self, rng: np.random.Generator) -> List[int]:
        """The classes of the objects 0, 1, ... of every quad image of an iteration (``rng``: seeded by it):
        ``random.sample(class_list, slots)``, each ordered choice of distinct entries equally likely."""
        picks = rng.choice(len(self.entries), size=self.slots, replace=False)
        return [int(self.entries[i]) for i in picks]

    def draw(
        self, rng: np.random.Generator, class_id: int, read_label: Callable[[int], np.ndarray]
    ) -> Tuple[int, Geometry]:
        """(dataset index, geometry) of one object of ``class_id``: an image uniformly, a geometry of ``rule``, again
        with a new image until the crop holds more than ``min_pixels`` pixels of the class (``read_label(index)``:
        the image's label at its stored resolution; ``rng``: the sample's position-seeded generator)."""
        images = self._images[class_id]
        for _ in range(RELEASED_OBJECT_MAX_DRAWS):
            index = int(images[rng.integers(len(images))])
            label = read_label(index)
            geometry = self.rule.sample(rng, label.shape[:2])
            if class_pixels_in_crop(label, geometry, class_id, self.rule.interpolation) > self.min_pixels:
                return index, geometry
        raise RuntimeError(
            f"QuadMix rare objects as released: {RELEASED_OBJECT_MAX_DRAWS} crops of images holding class {class_id} "
            f"had at most {self.min_pixels} pixels of it (UDA.QUADMIX.RARE_MIN_PIXELS, RARE_RESIZE)"
        )


def rank_positions(iteration: int, global_batch: int, rank: int, world_size: int) -> List[int]:
    """The global sample positions rank ``rank`` uses at ``iteration``."""
    if global_batch % world_size:
        raise ValueError(f"A global batch of {global_batch} cannot be split over {world_size} processes")
    return [iteration * global_batch + j * world_size + rank for j in range(global_batch // world_size)]


class InferenceSampler(torch.utils.data.Sampler):
    """Each rank gets a contiguous shard of ``range(size)``; shard sizes differ by at most one (Detectron2's)."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self._size = size
        shard, extra = divmod(size, world_size)
        begin = shard * rank + min(rank, extra)
        end = begin + shard + (1 if rank < extra else 0)
        self._indices = range(begin, end)

    def __iter__(self) -> Iterator[int]:
        yield from self._indices

    def __len__(self) -> int:
        return len(self._indices)
