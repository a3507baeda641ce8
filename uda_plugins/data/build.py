"""The UDA training loader and the test loader.

The training loader yields, per iteration, one dict
``{"source": [d, ...], "target": [[d, ...], ...]}`` — the source batch and one batch per target domain (this
rank's share of the global ``SOLVER.IMS_PER_BATCH_SOURCE`` / ``IMS_PER_BATCH_TARGET``). A meta-architecture
declares with :class:`DataRequirements` which domains and labels it reads, so e.g. source-only training never
decodes target images and adaptation methods never read target labels.

Whole batches are built by data-loader workers (iteration ``k`` by worker ``k % NUM_WORKERS``, so the order is
fixed), and every sample is a function of its global position (see :mod:`uda_plugins.data.samplers`), which
makes the stream independent of the number of workers and processes and lets ``--resume`` continue it exactly.
With ``DATALOADER.RCS.ENABLED`` the source stream draws its images by rare-class sampling
(:class:`~uda_plugins.data.samplers.RareClassSampler`) from the same position-seeded RNG, so this still holds.
A method may ask for extra streams (``DataRequirements.source_paste``: QuadMix's rare objects, served under
``batch["source_paste"]``; ``labelled_paste``: STAL's paste samples, under ``batch["labelled_paste"]``); they follow
the same rules with their own salts.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pickle
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from uda_plugins.active_learning.selection import group_of, select_images
from uda_plugins.d2 import CfgNode, DatasetCatalog, MetadataCatalog, comm

from .class_stats import ensure_class_stats
from .datasets.common import read_label_as_grey
from .image_lists import read_image_list
from .mapper import UDADatasetMapper, crop_pad_image
from .samplers import (
    EpochPermutationSampler,
    InferenceSampler,
    RareClassSampler,
    SharedClassObjectSampler,
    rank_positions,
)
from .transforms import Geometry, GeometryRule, apply_geometry, resize_label

__all__ = [
    "DataRequirements",
    "SerializedList",
    "DomainStream",
    "UDABatchDataset",
    "UDATrainLoader",
    "build_uda_train_loader",
    "build_test_loader",
    "build_full_view_loader",
    "build_rare_class_sampler",
    "build_source_paste_stream",
    "build_labelled_paste_stream",
    "LabelledPasteStream",
    "released_object_rule",
    "SourcePasteStream",
    "source_class_pixels",
    "get_dataset_dicts",
]

logger = logging.getLogger(__name__)

# Salts that keep the augmentation RNG streams of the domains apart.
_SOURCE_SALT = 1
_SOURCE_PASTE_SALT = 50
_SOURCE_PASTE_CLASS_SALT = 51  # the per-iteration class draw of QuadMix's rare objects as released
_LABELLED_PASTE_SALT = 60  # STAL's paste samples
_TARGET_SALT = 100

# QuadMix pastes rare objects into two images per target image (T2SS and T2ST).
_QUAD_IMAGES_PER_TARGET = 2


@dataclass(frozen=True)
class DataRequirements:
    """What a meta-architecture reads from each training batch."""

    source: bool = True
    source_labels: bool = True
    target: bool = True
    target_labels: bool = False
    # An extra stream ``batch["source_paste"]`` of labelled source samples drawn by class for UDASS's rare-class
    # pasting (:func:`build_source_paste_stream`; its shape is configured under ``UDA.QUADMIX``).
    source_paste: bool = False
    # Target samples also carry ``full_image``: the whole image at INPUT.TARGET's base size (RESIZE, RESIZE_MODE; DUDA).
    target_full_image: bool = False
    # An extra stream ``batch["labelled_paste"]``: one paste sample (or none) per labelled sample, drawn from the
    # labelled pool at its own geometry (:func:`build_labelled_paste_stream`; configured under ``UDA.STAL``).
    labelled_paste: bool = False


class SerializedList(Dataset):
    """A list of dicts pickled into one numpy byte buffer: data-loader workers share it without the
    copy-on-read growth that touching Python objects causes (Detectron2's DatasetFromList does the same)."""

    def __init__(self, items: Sequence[dict]) -> None:
        blobs = [np.frombuffer(pickle.dumps(x, protocol=-1), dtype=np.uint8) for x in items]
        self._addr = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._data = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._addr)

    def __getitem__(self, idx: int) -> dict:
        start = 0 if idx == 0 else int(self._addr[idx - 1])
        return pickle.loads(memoryview(self._data[start : int(self._addr[idx])]))


def get_dataset_dicts(names: Sequence[str]) -> List[dict]:
    """The concatenated dicts of registered datasets; an unknown name or an empty dataset fails here."""
    if isinstance(names, str):
        names = [names]
    dicts: List[dict] = []
    for name in names:
        if name not in DatasetCatalog.list():
            raise KeyError(
                f"Dataset '{name}' is not registered. Registered: {', '.join(sorted(DatasetCatalog.list()))}"
            )
        items = DatasetCatalog.get(name)
        if not items:
            raise ValueError(f"Dataset '{name}' is empty")
        dicts.extend(items)
    return dicts


class DomainStream:
    """One domain's sample stream: dataset dicts, a position->index sampler, a mapper and a global batch.

    With ``rare_class_sampler`` the image of a position and the class its crop must show are drawn by it (and
    recorded in the sample as ``"rcs_class"``) instead of the epoch permutation; both draws come first from the
    sample's own RNG, seeded by (seed, salt, position), so the sample stays a function of its position.

    Every sample carries its ``dataset_index``. With a ``label_bank`` (:meth:`attach_label_bank`, an offline
    pseudo-label bank of this dataset), a sample also carries ``pseudo_label`` (the bank's current label of the image
    with the sample's geometry replayed, uint8) and ``pseudo_label_version``, once the bank has labels; the
    meta-architecture re-reads it in the main process when that version is no longer current.

    Before iteration ``first_iteration`` the stream yields empty batches (a stream only one phase of a method
    reads costs no I/O in the other); positions stay those of the iteration, so this changes no sample.

    With ``indices`` the stream draws only those images of ``dicts`` (a target stream without the labelled target
    images: ``DATASETS.TARGET_EXCLUDE_LABELED``); ``dataset_index`` and a label bank still index all of ``dicts``,
    so state kept per image of the dataset (a CutMix bank, a pseudo-label bank) does not depend on the subset.
    """

    def __init__(
        self,
        name: str,
        dicts: Sequence[dict],
        mapper: UDADatasetMapper,
        global_batch: int,
        seed: int,
        salt: int,
        rare_class_sampler: Optional[RareClassSampler] = None,
        first_iteration: int = 0,
        indices: Optional[Sequence[int]] = None,
    ) -> None:
        self.name = name
        self.num_images = len(dicts)
        self.indices = None if indices is None else [int(i) for i in indices]
        if self.indices is not None:
            if not self.indices:
                raise ValueError(f"The {name} stream draws from no image")
            if rare_class_sampler is not None:
                raise ValueError(f"The {name} stream: rare-class sampling draws from every image, not a subset")
            dicts = [dicts[i] for i in self.indices]
        self.dataset = SerializedList(dicts)
        self.mapper = mapper
        self.global_batch = global_batch
        self.salt = salt
        self.rare_class_sampler = rare_class_sampler
        self.first_iteration = int(first_iteration)
        self.label_bank = None
        # One file per original image size, for the start-up check that batches can be formed.
        self.size_examples: Dict[Tuple[int, int], str] = {}
        for d in dicts:
            if d.get("height") and d.get("width"):
                self.size_examples.setdefault((int(d["height"]), int(d["width"])), d["file_name"])
        if rare_class_sampler is not None and rare_class_sampler.num_images != len(self.dataset):
            raise ValueError(
                f"The rare-class sampler of '{name}' has statistics of {rare_class_sampler.num_images} images, "
                f"the stream {len(self.dataset)}"
            )
        self.set_seed(seed)

    def set_seed(self, seed: int) -> None:
        self.seed = int(seed)
        self.sampler = EpochPermutationSampler(len(self.dataset), self.seed + self.salt)

    def check_batchable(self, per_rank: int) -> None:
        """Fail now, not at some iteration, when two images of this stream could come out at different sizes and
        meet in a batch of ``per_rank``."""
        cause = self.mapper.rule.mixed_size_cause(self.size_examples) if per_rank > 1 else None
        if cause:
            raise ValueError(
                f"The {self.name} stream cannot form batches of {per_rank} images of one size: {cause}. Set "
                f"{self.mapper.rule.key}.CROP_PAD (bottom_right or center), RESIZE_MODE exact or a CROP_SIZE every "
                "scaled image reaches"
            )

    def attach_label_bank(self, bank) -> None:
        if len(bank) != self.num_images:
            raise ValueError(
                f"A pseudo-label bank of {len(bank)} images for the stream '{self.name}' of {self.num_images}"
            )
        self.label_bank = bank

    def image_index(self, index: int) -> int:
        """The index in the dataset (all of ``dicts``) of the stream's image ``index``."""
        return index if self.indices is None else self.indices[index]

    def batch(self, iteration: int, rank: int, world_size: int) -> List[dict]:
        out = []
        if iteration < self.first_iteration:
            return out
        for position in rank_positions(iteration, self.global_batch, rank, world_size):
            rng = np.random.default_rng([self.seed, self.salt, position])
            if self.rare_class_sampler is None:
                index = self.sampler.index(position)
                sample = self.mapper(self.dataset[index], rng=rng)
            else:
                index, class_id = self.rare_class_sampler.sample(rng)
                sample = self.mapper(self.dataset[index], rng=rng, required_class=class_id)
                sample["rcs_class"] = class_id
            index = self.image_index(int(index))
            sample["dataset_index"] = index
            if self.label_bank is not None and int(self.label_bank.versions[index]) >= 0:
                label, version = self.label_bank.read_crop(index, Geometry.from_dict(sample["geometry"]))
                sample["pseudo_label"], sample["pseudo_label_version"] = torch.from_numpy(label), version
            out.append(sample)
        return out


class SourcePasteStream(DomainStream):
    """QuadMix's rare source objects (:func:`build_source_paste_stream`). An iteration's global batch is ``slots``
    blocks of equal size, one per object of a quad image: the sample at offset ``o`` of the batch is object
    ``o // (global_batch / slots)`` of its quad image, recorded as ``"paste_slot"``. Every rank's and micro-batch's
    share then holds the blocks in order, each of the same size (their strided shares of a block of
    ``2 * IMS_PER_BATCH_TARGET`` samples), which is how :meth:`~uda_plugins.methods.quad_mix.QuadMix.rare_objects`
    reads them.

    With ``shared`` (UDA.QUADMIX.RARE_OBJECTS_AS_RELEASED) the classes of the blocks are one draw of the iteration
    (from an RNG seeded by it) and each sample draws its image and crop with :meth:`SharedClassObjectSampler.draw`;
    otherwise each sample draws its class with the stream's :class:`RareClassSampler`."""

    def __init__(self, *args, slots: int, shared: Optional[SharedClassObjectSampler] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if slots < 1 or self.global_batch % slots:
            raise ValueError(f"A rare-object batch of {self.global_batch} cannot hold {slots} objects per quad image")
        if shared is not None and shared.num_images != len(self.dataset):
            raise ValueError(f"Rare-object statistics of {shared.num_images} images, the stream {len(self.dataset)}")
        self.slots = int(slots)
        self.shared = shared

    def slot(self, position: int) -> int:
        return (position % self.global_batch) // (self.global_batch // self.slots)

    def batch(self, iteration: int, rank: int, world_size: int) -> List[dict]:
        if iteration < self.first_iteration:
            return []
        positions = rank_positions(iteration, self.global_batch, rank, world_size)
        if self.shared is None:
            out = super().batch(iteration, rank, world_size)
        else:
            classes = self.shared.iteration_classes(
                np.random.default_rng([self.seed, _SOURCE_PASTE_CLASS_SALT, iteration])
            )
            out = [self._released_object(p, classes[self.slot(p)]) for p in positions]
        for sample, position in zip(out, positions):
            sample["paste_slot"] = self.slot(position)
        return out

    def _released_object(self, position: int, class_id: int) -> dict:
        rng = np.random.default_rng([self.seed, self.salt, position])
        index, geometry = self.shared.draw(rng, class_id, lambda i: self.mapper.read_label(self.dataset[i]))
        sample = self.mapper(self.dataset[index], rng=rng, geometry=geometry)
        sample["rcs_class"] = class_id
        sample["dataset_index"] = index
        return sample


class LabelledPasteStream(DomainStream):
    """STAL's paste samples as released (ILM-ASSL ``core/dataset/cityscapes_semi_cp.py:179-192,220-226``): for the
    labelled sample at each position of the source stream, with probability ``prob`` a second labelled sample drawn
    uniformly from the same pool (``random.randint`` over the labelled list, so with replacement), mapped at its own
    geometry (the paste transform, ``:245,293``); otherwise ``{"pasted": False}`` and nothing is read (the release's
    all-zero paste, which leaves the sample as it is). A drawn sample carries ``"pasted": True``.

    With ``raw_labels`` the label of a sample whose dict names a ``raw_sem_seg_file_name`` (GTA5, SYNTHIA) is that file
    through PIL's ``convert("L")`` (``img_loader(paste_label_path, "L")``, ``:189``, which bypasses the id maps of
    ``__getitem__``), resized to its image where the two differ and carried through the sample's geometry."""

    def __init__(self, *args, prob: float, raw_labels: bool, raw_mapper: UDADatasetMapper, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prob = float(prob)
        self.raw_labels = bool(raw_labels)
        self.raw_mapper = raw_mapper  # the same geometry without reading the (mapped) label

    def batch(self, iteration: int, rank: int, world_size: int) -> List[dict]:
        out = []
        for position in rank_positions(iteration, self.global_batch, rank, world_size):
            rng = np.random.default_rng([self.seed, self.salt, position])
            if not rng.uniform() < self.prob:
                out.append({"pasted": False})
                continue
            index = int(rng.integers(len(self.dataset)))
            out.append(dict(self._paste_sample(self.dataset[index], rng), pasted=True, dataset_index=index))
        return out

    def _paste_sample(self, d: dict, rng: np.random.Generator) -> dict:
        raw_file = d.get("raw_sem_seg_file_name") if self.raw_labels else None
        if raw_file is None:
            return self.mapper(d, rng=rng)
        sample = self.raw_mapper(d, rng=rng)
        geometry = Geometry.from_dict(sample["geometry"])
        label = read_label_as_grey(raw_file)
        if label.shape != tuple(geometry.orig_size):  # the release resizes both to the image's scaled size
            label = resize_label(label, geometry.orig_size, self.raw_mapper.rule.interpolation)
        rule = self.raw_mapper.rule
        label = apply_geometry(rule.stretched(label, True), geometry, True, self.mapper.pad_label, rule.interpolation)
        sample["sem_seg"] = torch.from_numpy(label.astype(np.int64))
        return sample


class UDABatchDataset(IterableDataset):
    """Yields the batch dict of iterations ``start_iter, start_iter+1, ...``, sharded over workers. ``extras``
    are further streams a method asked for, each under its own batch key (``"source_paste"``)."""

    def __init__(
        self,
        source: Optional[DomainStream],
        targets: Sequence[DomainStream],
        rank: int,
        world_size: int,
        extras: Optional[Dict[str, DomainStream]] = None,
    ) -> None:
        self.source = source
        self.targets = list(targets)
        self.extras = dict(extras or {})
        self.rank = rank
        self.world_size = world_size
        self.start_iter = 0

    @property
    def streams(self) -> List[DomainStream]:
        return ([self.source] if self.source else []) + self.targets + list(self.extras.values())

    def batch(self, iteration: int) -> Dict[str, list]:
        out: Dict[str, list] = {}
        if self.source is not None:
            out["source"] = self.source.batch(iteration, self.rank, self.world_size)
        if self.targets:
            out["target"] = [t.batch(iteration, self.rank, self.world_size) for t in self.targets]
        for key, stream in self.extras.items():
            out[key] = stream.batch(iteration, self.rank, self.world_size)
        return out

    def __iter__(self) -> Iterator[Dict[str, list]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for iteration in itertools.count(self.start_iter + worker, num_workers):
            yield self.batch(iteration)


def _identity(x):
    return x


def _worker_init(_worker_id: int) -> None:
    # Several workers on few cores: keep each to one thread so they do not fight the training process.
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(0)


class UDATrainLoader:
    """An infinite iterable of UDA batches. Its whole state is (seed, start iteration): ``state_dict`` goes into
    the checkpoint and ``set_start_iter`` (on resume) makes the next iterator start at that iteration's samples,
    so a resumed run reads exactly the samples the uninterrupted run would have read."""

    def __init__(self, dataset: UDABatchDataset, num_workers: int, seed: int) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.seed = seed

    def attach_target_label_banks(self, banks) -> None:
        """Serve each target stream's pseudo-labels from its bank (``banks``: one per target, or None); before the
        first iteration is drawn."""
        for stream, bank in zip(self.dataset.targets, banks):
            if bank is not None:
                stream.attach_label_bank(bank)

    def serve_banks_of(self, model) -> None:
        """Serve the pseudo-label banks of ``model`` (a meta-architecture), when it keeps any, and tell a model that
        draws target images itself (``use_target_pools``: STAL's CutMix partners) which images each target stream
        draws (None: all)."""
        if hasattr(model, "pseudo_label_banks"):
            self.attach_target_label_banks(model.pseudo_label_banks())
        if hasattr(model, "use_target_pools"):
            model.use_target_pools([stream.indices for stream in self.dataset.targets])

    def set_start_iter(self, start_iter: int) -> None:
        self.dataset.start_iter = int(start_iter)

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore the data seed (it differs from the config's when SEED < 0 drew a random one)."""
        self.seed = int(state["seed"])
        for stream in self.dataset.streams:
            stream.set_seed(self.seed)

    def __iter__(self) -> Iterator[Dict[str, list]]:
        if self.num_workers == 0:
            return iter(self.dataset)
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            worker_init_fn=_worker_init,
            prefetch_factor=2,
            persistent_workers=False,
        )
        return iter(loader)


def _data_seed(cfg: CfgNode) -> int:
    # Every rank must draw the same stream, so a random seed (SEED < 0) is drawn once and shared.
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()


def _source_names(cfg: CfgNode) -> List[str]:
    names = cfg.DATASETS.SOURCE_TRAIN
    return [names] if isinstance(names, str) else list(names)


def source_class_pixels(
    cfg: CfgNode, names: Sequence[str], dicts_per_name: Sequence[Sequence[dict]]
) -> Tuple[np.ndarray, Optional[List[str]]]:
    """The (num_images, num_classes) class pixel counts of the source datasets ``names`` (dicts concatenated in
    that order), from their cached class statistics (:mod:`uda_plugins.data.class_stats`), and the class names.
    A missing or stale cache is computed by the main process while the others wait, then read by all (a process
    that still finds none, e.g. on another machine without a shared file system, computes it itself)."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    ignore = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    kwargs = dict(stats_dir=cfg.DATALOADER.RCS.STATS_DIR, jobs=min(8, os.cpu_count() or 1))
    parts = []
    for name, dicts in zip(names, dicts_per_name):
        if comm.is_main_process():
            pixels, path = ensure_class_stats(name, dicts, num_classes, ignore, **kwargs)
        comm.synchronize()
        if not comm.is_main_process():
            pixels, path = ensure_class_stats(name, dicts, num_classes, ignore, progress=False, **kwargs)
        logger.info("Class statistics of '%s': %s", name, path)
        parts.append(pixels)
    class_names = MetadataCatalog.get(names[0]).get("stuff_classes")
    if class_names is not None and len(class_names) != num_classes:
        class_names = None
    return np.concatenate(parts), class_names


def build_rare_class_sampler(
    cfg: CfgNode, names: Sequence[str], dicts_per_name: Sequence[Sequence[dict]]
) -> RareClassSampler:
    """The :class:`RareClassSampler` of the source datasets ``names`` (see :func:`source_class_pixels`)."""
    rcs = cfg.DATALOADER.RCS
    pixels, class_names = source_class_pixels(cfg, names, dicts_per_name)
    sampler = RareClassSampler(pixels, rcs.TEMPERATURE, rcs.MIN_PIXELS, class_names)
    logger.info(
        "Rare-class sampling of the source (T=%s, > %s pixels per image, crops > %s pixels): class probabilities\n%s",
        rcs.TEMPERATURE,
        rcs.MIN_PIXELS,
        rcs.MIN_PIXELS * rcs.MIN_CROP_RATIO,
        sampler.describe(),
    )
    return sampler


def build_source_paste_stream(cfg: CfgNode, seed: int) -> Optional[DomainStream]:
    """UDASS's rare-class objects as a loader stream (None when ``UDA.QUADMIX.PASTE_PER_IMAGE`` is 0).

    The reference (ZHE-SAPI/UDASS ``image_udass/seg/mmseg/models/uda/ok/dacs_gta.py``, ``rand_mixer``) reads, inside
    the training step, a random source image holding a class drawn from a fixed list, drawing new images until the
    crop has more than 50 pixels of it. Here the loader serves those samples (:class:`SourcePasteStream`):
    ``PASTE_PER_IMAGE`` per quad image (T2SS and T2ST) per target image, i.e. a global batch of
    ``IMS_PER_BATCH_TARGET * 2 * PASTE_PER_IMAGE``, each carrying its class as ``"rcs_class"``. By default each
    sample draws its class with P(c) proportional to its multiplicity in ``RARE_CLASSES`` and then an image with more
    than ``RARE_MIN_PIXELS`` pixels of it (:class:`RareClassSampler`, from the cached source class statistics); it
    goes through the source mapper (``INPUT.SOURCE`` geometry) with its crop re-drawn up to
    ``DATALOADER.RCS.CROP_REDRAWS`` times until it holds more than ``RARE_MIN_PIXELS`` pixels of the class. With
    ``RARE_OBJECTS_AS_RELEASED`` the draws are the release's (:class:`SharedClassObjectSampler`, geometry
    :func:`released_object_rule`). Its own salts keep it a function of (seed, position), so ``--resume`` continues it
    exactly. It is empty before ``UDA.QUADMIX.START_ITER``, where nothing is pasted.
    """
    quad = cfg.UDA.QUADMIX
    if quad.PASTE_PER_IMAGE <= 0:
        return None
    names = _source_names(cfg)
    dicts_per_name = [get_dataset_dicts([name]) for name in names]
    dicts = [d for per_name in dicts_per_name for d in per_name]
    pixels, class_names = source_class_pixels(cfg, names, dicts_per_name)
    sampler, shared = None, None
    if quad.RARE_OBJECTS_AS_RELEASED:
        rule = released_object_rule(cfg)
        sizes = [(d.get("height"), d.get("width")) for d in dicts]
        shared = SharedClassObjectSampler(
            pixels, sizes, quad.RARE_CLASSES, quad.PASTE_PER_IMAGE, rule, quad.RARE_MIN_PIXELS, class_names
        )
        mapper = UDADatasetMapper(
            is_train=True,
            rule=rule,
            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            load_label=True,
            ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        )
        logger.info(
            "QuadMix rare-class pasting as released: %d of the list %s per iteration, shared by every quad image; "
            "objects stretched to %s, cropped to %s, a new image until the crop has > %s pixels of the class",
            quad.PASTE_PER_IMAGE,
            shared.entries.tolist(),
            tuple(rule.resize),
            tuple(rule.crop_size),
            quad.RARE_MIN_PIXELS,
        )
    else:
        sampler = RareClassSampler(
            pixels, cfg.DATALOADER.RCS.TEMPERATURE, quad.RARE_MIN_PIXELS, class_names, class_list=quad.RARE_CLASSES
        )
        logger.info(
            "QuadMix rare-class pasting: %d objects per quad image, classes (> %s pixels per image and crop)\n%s",
            quad.PASTE_PER_IMAGE,
            quad.RARE_MIN_PIXELS,
            sampler.describe(),
        )
        mapper = UDADatasetMapper.from_config(cfg, "source", load_label=True, class_crop_pixels=quad.RARE_MIN_PIXELS)
    return SourcePasteStream(
        "source_paste",
        dicts,
        mapper,
        cfg.SOLVER.IMS_PER_BATCH_TARGET * _QUAD_IMAGES_PER_TARGET * quad.PASTE_PER_IMAGE,
        seed,
        _SOURCE_PASTE_SALT,
        rare_class_sampler=sampler,
        first_iteration=quad.START_ITER,
        slots=quad.PASTE_PER_IMAGE,
        shared=shared,
    )


def build_labelled_paste_stream(cfg: CfgNode, dicts: Sequence[dict], seed: int) -> Optional[LabelledPasteStream]:
    """STAL's paste samples drawn from ``dicts`` (the labelled pool of the source stream) with
    ``UDA.STAL.PASTE_PARTNER second_sample`` (None otherwise, or when copy-paste is off): one per labelled sample
    (global batch ``IMS_PER_BATCH_SOURCE``, the same positions), a paste with probability ``COPY_PASTE_PROB``, at
    INPUT.SOURCE's geometry with the random scale from ``PASTE_RATIO_RANGE`` (the release's ``acp.rand_resize``
    0.1-2.0). With ``PASTE_RAW_SOURCE_LABELS`` the paste samples are read as the release reads them: at their file's
    size (no ``INPUT.SOURCE.RESIZE``; Cityscapes already is 2048x1024) and, for GTA5 and SYNTHIA, with the label file
    as downloaded through PIL's ``convert("L")`` (:class:`LabelledPasteStream`)."""
    s = cfg.UDA.STAL
    if s.PASTE_PARTNER not in PASTE_PARTNERS:
        raise ValueError(f"UDA.STAL.PASTE_PARTNER must be one of {PASTE_PARTNERS}, not '{s.PASTE_PARTNER}'")
    if s.PASTE_PARTNER != "second_sample" or s.COPY_PASTE_CLASSES <= 0 or s.COPY_PASTE_PROB <= 0:
        return None
    source = GeometryRule.from_config(cfg.INPUT.SOURCE, "INPUT.SOURCE")
    if not source.crops or source.crop_pad == "none":
        raise ValueError(
            "UDA.STAL.PASTE_PARTNER second_sample pastes a sample at its own scale into the labelled crops, so "
            "INPUT.SOURCE needs a CROP_SIZE with CROP_PAD center or bottom_right (the release: 769x769, center); or "
            "set UDA.STAL.PASTE_PARTNER batch"
        )
    rule = dataclasses.replace(
        source,
        ratio_range=tuple(float(v) for v in s.PASTE_RATIO_RANGE),
        resize=(0, 0) if s.PASTE_RAW_SOURCE_LABELS else source.resize,
        key="UDA.STAL (paste samples: INPUT.SOURCE, PASTE_RATIO_RANGE)",
    )
    mappers = [
        UDADatasetMapper(
            is_train=True,
            rule=rule,
            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            load_label=load_label,
            ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            pad_image=crop_pad_image(cfg, cfg.INPUT.SOURCE),
            pad_label=cfg.INPUT.SOURCE.CROP_PAD_LABEL,
        )
        for load_label in (True, False)
    ]
    logger.info(
        "STAL paste samples: a second labelled sample for %.0f%% of the labelled ones, at a scale of %s%s",
        100 * s.COPY_PASTE_PROB,
        tuple(rule.ratio_range),
        ", read as released (the file's size; GTA5/SYNTHIA labels as downloaded, in grey)"
        if s.PASTE_RAW_SOURCE_LABELS
        else "",
    )
    return LabelledPasteStream(
        "labelled_paste",
        dicts,
        mappers[0],
        cfg.SOLVER.IMS_PER_BATCH_SOURCE,
        seed,
        _LABELLED_PASTE_SALT,
        prob=min(float(s.COPY_PASTE_PROB), 1.0),
        raw_labels=s.PASTE_RAW_SOURCE_LABELS,
        raw_mapper=mappers[1],
    )


PASTE_PARTNERS = ("second_sample", "batch")


def released_object_rule(cfg: CfgNode) -> GeometryRule:
    """The geometry of a rare object as released (rand_mixer, ``ok/dacs_gta.py:167-171, 199-208``; the same in
    ``dacs_syn.py``): PIL's ``resize`` to ``UDA.QUADMIX.RARE_RESIZE`` whatever the aspect ratio (BILINEAR for the
    image, NEAREST for the label), then ``RandomCrop_gta``, a uniform crop of ``INPUT.SOURCE.CROP_SIZE`` (1024x1024 in
    the release, the size of its training crops) inside it, without flip or category-ratio rule."""
    resize = tuple(int(v) for v in cfg.UDA.QUADMIX.RARE_RESIZE)
    crop = tuple(int(v) for v in cfg.INPUT.SOURCE.CROP_SIZE)
    if len(resize) != 2 or min(resize) <= 0:
        raise ValueError(f"UDA.QUADMIX.RARE_RESIZE must be (h, w) > 0, not {list(resize)}")
    if crop[0] > resize[0] or crop[1] > resize[1]:
        raise ValueError(
            f"INPUT.SOURCE.CROP_SIZE {list(crop)} is larger than UDA.QUADMIX.RARE_RESIZE {list(resize)}: the rare "
            "objects as released are crops of the stretched image"
        )
    return GeometryRule(
        resize=resize,
        resize_mode="exact",
        crop_size=crop,
        crop_pad="none",
        interpolation="pil_bilinear",
        flip_prob=0.0,
        key="UDA.QUADMIX (RARE_OBJECTS_AS_RELEASED)",
    )


def image_subset(spec: str, dicts: Sequence[dict], seed: int, key: str = "") -> List[int]:
    """The images of ``dicts`` a list spec names (``DATASETS.TARGET_LABELED_LIST``, ``DATASETS.SOURCE_LIST``): a list
    file, or ``random:<n>`` (n images at random with per-folder quotas, as an active-learning seed set). ``key``: the
    config key that names it, for the message when the file is missing."""
    if spec.startswith("random:"):
        groups = [group_of(d["file_name"]) for d in dicts]
        n = int(spec.split(":", 1)[1])
        return select_images(n, groups, np.zeros(len(dicts), bool), "random", rng=np.random.default_rng(seed))
    if key and not os.path.isfile(spec):
        raise FileNotFoundError(f"{key} '{spec}' does not exist: {_list_hint(spec)}")
    return read_image_list(spec, dicts)


def _list_hint(spec: str) -> str:
    """How to make a missing list file."""
    if "ilm_assl" in spec.replace(os.sep, "/").split("/"):
        return (
            "make ILM-ASSL's lists from the authors' data/<benchmark>/<budget>/labeled.txt with 'python "
            "tools/convert_ilm_assl_list.py <ILM-ASSL>/data/gtav2cityscapes/1.0%/labeled.txt --source-out "
            "datasets/lists/ilm_assl/gtav2cityscapes/source_2000.txt --target-out "
            "datasets/lists/ilm_assl/gtav2cityscapes/labeled_1pct.txt' (the config's header gives its own command; "
            "run it from the folder you train in)"
        )
    return "a list file names one image per line (tools/active_learning_round.py writes them); see the config's header"


def labelled_target_indices(cfg: CfgNode, dicts: Sequence[dict], seed: int) -> List[int]:
    """The indices in ``dicts`` (``DATASETS.TARGET_TRAIN[0]``'s) of the images ``DATASETS.TARGET_LABELED_LIST`` names
    (``random:<n>`` drawn with the data ``seed``)."""
    return image_subset(cfg.DATASETS.TARGET_LABELED_LIST, dicts, seed, "DATASETS.TARGET_LABELED_LIST")


def unlabelled_target_indices(cfg: CfgNode, dicts: Sequence[dict], seed: int) -> Optional[List[int]]:
    """The images of the first target stream with ``DATASETS.TARGET_EXCLUDE_LABELED``: those of ``dicts`` not in
    ``DATASETS.TARGET_LABELED_LIST`` (ILM-ASSL's ``unlabeled.txt``, the complement of its ``labeled.txt``:
    ``cityscapes_semi_cp.py:320-326``); None (all of them) without the flag or a list."""
    if not (cfg.DATASETS.TARGET_EXCLUDE_LABELED and cfg.DATASETS.TARGET_LABELED_LIST):
        return None
    labelled = set(labelled_target_indices(cfg, dicts, seed))
    return [i for i in range(len(dicts)) if i not in labelled]


def labelled_target_entries(cfg: CfgNode, seed: int) -> List[dict]:
    """The labelled target images of ``DATASETS.TARGET_LABELED_LIST`` (``random:<n>`` drawn with the data
    ``seed``), cycled to ``TARGET_LABELED_ENTRIES`` dataset dicts (with their ground truth) for the source stream."""
    if not cfg.DATASETS.TARGET_TRAIN:
        raise ValueError("DATASETS.TARGET_LABELED_LIST names images of DATASETS.TARGET_TRAIN[0], which is empty")
    name = cfg.DATASETS.TARGET_TRAIN[0]
    dicts = get_dataset_dicts([name])
    chosen = [dicts[i] for i in labelled_target_indices(cfg, dicts, seed)]
    if not chosen:
        raise ValueError(f"DATASETS.TARGET_LABELED_LIST '{cfg.DATASETS.TARGET_LABELED_LIST}' names no image")
    unlabelled = [d["file_name"] for d in chosen if not d.get("sem_seg_file_name")]
    if unlabelled:
        raise ValueError(f"'{unlabelled[0]}' of DATASETS.TARGET_LABELED_LIST has no label in '{name}'")
    entries = cfg.DATASETS.TARGET_LABELED_ENTRIES
    entries = len(dicts) - len(chosen) if entries < 0 else entries
    entries = max(entries, len(chosen))
    logger.info("Labelled target images: %d of %s in %d entries of the source stream", len(chosen), name, entries)
    return [chosen[k % len(chosen)] for k in range(entries)]


def build_uda_train_loader(cfg: CfgNode, requirements: DataRequirements, seed: Optional[int] = None) -> UDATrainLoader:
    """The training loader for ``cfg`` (``DATASETS.SOURCE_TRAIN``, ``DATASETS.TARGET_TRAIN``, the per-domain
    ``INPUT`` and global batch sizes), reading only what ``requirements`` asks for."""
    seed = _data_seed(cfg) if seed is None else seed
    rank, world_size = comm.get_rank(), comm.get_world_size()
    source = None
    if requirements.source:
        for key in ("TARGET_LABELED_LIST", "SOURCE_LIST"):
            if cfg.DATASETS[key] and cfg.DATALOADER.RCS.ENABLED:
                raise ValueError(
                    f"DATASETS.{key} with DATALOADER.RCS.ENABLED: rare-class sampling draws from the statistics of "
                    "every source image, not from a changed set of images"
                )
        rare_class_sampler = None
        if cfg.DATALOADER.RCS.ENABLED:
            names = _source_names(cfg)
            dicts_per_name = [get_dataset_dicts([name]) for name in names]
            source_dicts = [d for dicts in dicts_per_name for d in dicts]
            rare_class_sampler = build_rare_class_sampler(cfg, names, dicts_per_name)
        else:
            source_dicts = get_dataset_dicts(cfg.DATASETS.SOURCE_TRAIN)
        if cfg.DATASETS.SOURCE_LIST:
            chosen = image_subset(cfg.DATASETS.SOURCE_LIST, source_dicts, seed, "DATASETS.SOURCE_LIST")
            source_dicts = [source_dicts[i] for i in chosen]
        if cfg.DATASETS.TARGET_LABELED_LIST:
            source_dicts = source_dicts + labelled_target_entries(cfg, seed)
        source = DomainStream(
            "source",
            source_dicts,
            UDADatasetMapper.from_config(cfg, "source", load_label=requirements.source_labels),
            cfg.SOLVER.IMS_PER_BATCH_SOURCE,
            seed,
            _SOURCE_SALT,
            rare_class_sampler=rare_class_sampler,
        )
    targets = []
    if requirements.target:
        if not cfg.DATASETS.TARGET_TRAIN:
            raise ValueError("This method needs target data but DATASETS.TARGET_TRAIN is empty")
        for k, name in enumerate(cfg.DATASETS.TARGET_TRAIN):
            dicts = get_dataset_dicts([name])
            targets.append(
                DomainStream(
                    f"target{k}",
                    dicts,
                    UDADatasetMapper.from_config(
                        cfg, "target", load_label=requirements.target_labels, full_view=requirements.target_full_image
                    ),
                    cfg.SOLVER.IMS_PER_BATCH_TARGET,
                    seed,
                    _TARGET_SALT + k,
                    indices=unlabelled_target_indices(cfg, dicts, seed) if k == 0 else None,
                )
            )
    extras = {}
    if requirements.labelled_paste and source is not None:
        paste = build_labelled_paste_stream(cfg, source_dicts, seed)
        if paste is not None:
            extras["labelled_paste"] = paste
    if requirements.source_paste:
        paste = build_source_paste_stream(cfg, seed)
        if paste is not None:
            extras["source_paste"] = paste
    accumulation = cfg.SOLVER.GRAD_ACCUMULATION_STEPS
    for stream in ([source] if source else []) + targets + list(extras.values()):
        if stream.global_batch % (world_size * accumulation):
            raise ValueError(
                f"The global {stream.name} batch ({stream.global_batch}) is not divisible by the number of "
                f"processes ({world_size}) times SOLVER.GRAD_ACCUMULATION_STEPS ({accumulation}); batch sizes "
                "in the config are global"
            )
        stream.check_batchable(stream.global_batch // (world_size * accumulation))
    logger.info(
        "UDA train loader: source %s, targets %s, seed %d%s",
        f"{len(source.dataset)} images x{source.global_batch}" if source else "unused",
        [f"{len(t.dataset)} images x{t.global_batch}" for t in targets] or "unused",
        seed,
        "".join(f", {key} x{st.global_batch} from iteration {st.first_iteration}" for key, st in extras.items()),
    )
    dataset = UDABatchDataset(source, targets, rank, world_size, extras)
    return UDATrainLoader(dataset, cfg.DATALOADER.NUM_WORKERS, seed)


class _MappedList(Dataset):
    def __init__(self, dicts: Sequence[dict], mapper: UDADatasetMapper) -> None:
        self.dicts = SerializedList(dicts)
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, idx: int) -> dict:
        out = self.mapper(self.dicts[idx])
        out["dataset_index"] = idx
        return out


def build_test_loader(cfg: CfgNode, dataset_name: str, load_label: bool = True) -> DataLoader:
    """A finite loader over this rank's contiguous shard of ``dataset_name``, ``TEST.IMS_PER_BATCH`` images
    per batch (lists of dicts, Detectron2's test-loader contract)."""
    dicts = get_dataset_dicts([dataset_name])
    if load_label and any("sem_seg_file_name" not in d for d in dicts):
        load_label = False  # an unlabelled split (e.g. a test set): predict only
    mapper = UDADatasetMapper.from_config(cfg, "test", load_label=load_label)
    return _sharded_loader(dicts, mapper, cfg.TEST.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS)


def _sharded_loader(dicts: Sequence[dict], mapper: UDADatasetMapper, batch_size: int, num_workers: int) -> DataLoader:
    """Batches (lists of mapped dicts with their ``dataset_index``) of this rank's contiguous shard of ``dicts``."""
    dataset = _MappedList(dicts, mapper)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InferenceSampler(len(dataset), comm.get_rank(), comm.get_world_size()),
        num_workers=num_workers,
        collate_fn=_identity,
        worker_init_fn=_worker_init,
    )


def build_full_view_loader(cfg: CfgNode, dataset_name: str, batch_size: int, limit: int = -1) -> DataLoader:
    """This rank's contiguous shard of the (first ``limit``, -1 = all) images of the training set ``dataset_name``,
    each at ``INPUT.TARGET``'s base size (RESIZE and RESIZE_MODE) without random geometry, no labels, ``batch_size``
    per batch: what a teacher predicts on to fill or refresh a pseudo-label bank or to re-estimate BatchNorm
    statistics."""
    dicts = get_dataset_dicts([dataset_name])
    if limit >= 0:
        dicts = dicts[:limit]
    mapper = UDADatasetMapper.from_config(cfg, "target", load_label=False, is_train=False)
    return _sharded_loader(dicts, mapper, batch_size, cfg.DATALOADER.NUM_WORKERS)
