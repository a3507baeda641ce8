"""QuadMix's masks and mixes on tensors: the source and target class masks, the four mixes and rare-object pasting.

Follows ZHE-SAPI/UDASS ``image_udass/seg/mmseg/models/utils/dacs_transforms_zz.py`` (``get_class_masks_quad_s``,
``get_class_masks_quad_t``, ``one_mix``) and ``image_udass/seg/mmseg/models/uda/ok/dacs_gta.py``
(``DACS.forward_train`` from iteration 6000 on, ``rand_mixer.mix``). With ``x_s', y_s', x_t', ŷ_t', q'`` the previous
batch and ``x_s, y_s, x_t, ŷ_t, q`` the current one (images, labels, pseudo-labels, pseudo-label weights):

* ``M_s``: ``classes_per_mask`` classes of each previous source label ``y_s'``;
* ``S2S = M_s (x_s', y_s', 1) + (1 - M_s) (x_s, y_s, 1)`` and ``S2T = M_s (x_s', y_s', 1) + (1 - M_s) (x_t, ŷ_t, q)``;
* ``M_t``: ``classes_per_mask`` classes of each previous pseudo-label ``ŷ_t'`` other than those of ``M_s``, where the
  teacher was confident;
* ``T2SS = M_t (x_t', ŷ_t', q') + (1 - M_t) S2S`` and ``T2ST = M_t (x_t', ŷ_t', q') + (1 - M_t) S2T``;
* rare source objects pasted on top of T2SS and T2ST.

Random choices use torch's global generator (seeded per iteration by the trainer). The reference's quirks are
reproducible with ``reference_quirks`` (``UDA.QUADMIX.REFERENCE_QUIRKS``, docs/methods.md §4.7): the ignore label
can be a source-mask class, the target mask excludes the source mask's *positions in* ``unique(y_s')`` instead of
its class ids, and pasted objects keep the weight beneath them instead of 1.
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

import torch

from .class_mix import mix

__all__ = [
    "Labelled",
    "QuadMixes",
    "source_quad_masks",
    "target_quad_masks",
    "mix_labelled",
    "quad_mix",
    "paste_objects",
    "released_paste_normalization",
    "RAND_MIXER_MEAN",
]

# The means rand_mixer subtracts (ZHE-SAPI/UDASS image_udass/seg/mmseg/models/uda/ok/dacs_gta.py:47, IMG_MEAN), in RGB
# order although it subtracts them from BGR images.
RAND_MIXER_MEAN = (123.675, 116.28, 103.53)


class Labelled(NamedTuple):
    """A batch of training images with what the loss needs."""

    image: torch.Tensor  # (N, 3, H, W), normalised
    label: torch.Tensor  # (N, H, W), long
    weight: torch.Tensor  # (N, H, W), float pixel weight


class QuadMixes(NamedTuple):
    """The four mixes of one step: the backgrounds S2S, S2T and the two images trained on, T2SS and T2ST."""

    ss: Labelled
    st: Labelled
    tss: Labelled
    tst: Labelled


def _choose(classes: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of ``min(k, len(classes))`` entries of ``classes``, uniformly without replacement."""
    return torch.randperm(classes.numel(), device="cpu")[:k].to(classes.device)


def source_quad_masks(
    labels: torch.Tensor, classes_per_mask: int = 2, ignore_label: int = 255, reference_quirks: bool = False
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``get_class_masks_quad_s``: per (previous) source label, ``classes_per_mask`` of its classes (fewer when it
    has fewer; never the ignore label unless ``reference_quirks``).

    Returns the (N, H, W) float masks and, per image, what the target mask must exclude: the chosen class ids, or
    with ``reference_quirks`` their positions in ``unique(label)`` (the reference's bug)."""
    masks, excluded = [], []
    for label in labels:
        classes = torch.unique(label)
        if not reference_quirks:
            classes = classes[classes != ignore_label]
        positions = _choose(classes, classes_per_mask)
        chosen = classes[positions]
        masks.append(torch.isin(label, chosen))
        excluded.append(positions if reference_quirks else chosen)
    return torch.stack(masks).float(), excluded


def target_quad_masks(
    pseudo_labels: torch.Tensor,
    confident: torch.Tensor,
    excluded: Sequence[torch.Tensor],
    classes_per_mask: int = 2,
) -> torch.Tensor:
    """``get_class_masks_quad_t``: per (previous) pseudo-label, ``classes_per_mask`` of its classes not in
    ``excluded[i]`` (fewer when fewer remain, none when none do), restricted to the ``confident`` (N, H, W) bool
    pixels -> (N, H, W) float masks."""
    masks = []
    for label, gate, exclude in zip(pseudo_labels, confident, excluded):
        classes = torch.unique(label)
        classes = classes[~torch.isin(classes, exclude.to(classes.device))]
        chosen = classes[_choose(classes, classes_per_mask)]
        masks.append(torch.isin(label, chosen) & gate.bool())
    return torch.stack(masks).float()


def mix_labelled(mask: torch.Tensor, foreground: Labelled, background: Labelled) -> Labelled:
    """``one_mix`` on image, label and weight: ``foreground`` where the (N, H, W) ``mask`` is 1, else
    ``background``."""
    keep = mask.bool()
    return Labelled(
        mix(mask, foreground.image, background.image),
        torch.where(keep, foreground.label, background.label),
        torch.where(keep, foreground.weight, background.weight),
    )


def quad_mix(
    source_masks: torch.Tensor,
    target_masks: torch.Tensor,
    previous_source: Labelled,
    source: Labelled,
    previous_target: Labelled,
    target: Labelled,
) -> QuadMixes:
    """The four mixes of the module docstring; every argument is paired image by image (N of each). The source
    batches carry weight 1, the target batches their pseudo-labels and pseudo-label weights."""
    ss = mix_labelled(source_masks, previous_source, source)
    st = mix_labelled(source_masks, previous_source, target)
    return QuadMixes(
        ss, st, mix_labelled(target_masks, previous_target, ss), mix_labelled(target_masks, previous_target, st)
    )


def paste_objects(
    base: Labelled,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: torch.Tensor,
    keep_weight: bool = False,
) -> Labelled:
    """``rand_mixer.mix``: paste the pixels of class ``classes[i, p]`` of source sample ``(images, labels)[i, p]``
    ((N, P, 3, H, W), (N, P, H, W), (N, P)) on image ``i`` of ``base``, ``p = 0, 1, ...`` in turn (later objects on
    top). The pasted pixels take the object's label and weight 1 (``keep_weight``: the weight beneath, as the
    reference)."""
    image, label, weight = base
    for p in range(images.shape[1]):
        cls = classes[:, p, None, None]
        where = labels[:, p] == cls
        image = mix(where.float(), images[:, p], image)
        label = torch.where(where, cls, label)
        if not keep_weight:
            weight = weight.masked_fill(where, 1.0)
    return Labelled(image, label, weight)


def released_paste_normalization(rgb: torch.Tensor) -> torch.Tensor:
    """A pasted object's (N, 3, H, W) RGB image in 0..255 as the release's ``rand_mixer`` hands it to the network
    (``ok/dacs_gta.py:225-228``, the same in ``dacs_syn.py``, ``dacs_gta_cnn.py``, ``dacs_syn_cnn.py``):
    ``img[:, :, ::-1]`` (to BGR), ``- IMG_MEAN`` (the RGB-order means), ``/ 255``, in float32. The network reads
    channel 0 as red, so red (255, 0, 0) arrives as (-0.485, -0.456, 0.594), where the model's normalisation gives
    (2.25, -2.04, -1.80): channel-swapped objects of about a quarter of the contrast. The colour jitter after the
    paste denormalises the whole image with the model's mean and std, objects included, as the release's does."""
    mean = torch.tensor(RAND_MIXER_MEAN, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
    return (rgb.float().flip(1) - mean) / 255.0
