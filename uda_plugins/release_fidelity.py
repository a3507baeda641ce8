"""One switch between a method's release and our fixes: ``UDA.RELEASE_FIDELITY``.

Each method's known differences from its authors' code that we fix, or that we keep as an option, have a config key
each (docs/release-audit/ and each method's deviation table). :data:`QUIRKS` lists them per
``MODEL.META_ARCHITECTURE`` with the value that reproduces the release and the value of our fix.
``UDA.RELEASE_FIDELITY`` moves a whole config between the two:

* ``""`` (the default): every key as the config file and the command line set it (paper configs set the release's);
* ``"as_released"``: every listed key of the config's method at the release's value;
* ``"fixed"``: every listed key at our fix.

A ``KEY VALUE`` given on the command line for one of the listed keys still wins, so one quirk can be kept or fixed
alone. The resolved values are what the run's ``config.yaml`` records (the umbrella itself is reset to ``""`` there,
so re-reading the file gives the same run), and the log lists what the umbrella changed.

The table is data, not code, so that tests can check every paper config against it (``tests/test_release_fidelity.py``)
and the README's table of switches is the same list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ["Quirk", "QUIRKS", "FIDELITIES", "quirks_of", "apply_release_fidelity"]

FIDELITIES = ("", "as_released", "fixed")


@dataclass(frozen=True)
class Quirk:
    """A config key whose two values are the release's behaviour and our fix (``item`` names the audit's entry)."""

    key: str
    released: Any
    fixed: Any
    item: str
    what: str


_DACS_FAMILY = (
    Quirk(
        "UDA.MIX.CLASSES_FROM_BATCH",
        True,
        False,
        "A1",
        "ClassMix classes drawn from the whole source batch, the ignore label included; the fix: each image's own",
    ),
    Quirk(
        "MODEL.HRDA.REFERENCE_CROP_OFFSETS",
        True,
        False,
        "B1",
        "HRDA's detail crop never at the last aligned offset; the fix: every aligned offset",
    ),
    Quirk(
        "MODEL.HRDA.LR_LOSS_ON_ATTENDED_LOGITS",
        True,
        False,
        "HRDA",
        "HRDA's low-resolution loss on the attention-weighted context logits; the fix: on the context logits",
    ),
    Quirk(
        "SOLVER.HEAD_NORMS_DECAYED",
        True,
        False,
        "B2",
        "the heads' norm layers decayed at SOLVER.WEIGHT_DECAY (mmcv's custom-key precedence: head before norm); the "
        "fix: SOLVER.WEIGHT_DECAY_NORM for every norm",
    ),
    Quirk(
        "UDA.MIC.STRONG_AUG_AS_RELEASED",
        True,
        False,
        "B4",
        "MIC's masked images: one jitter order and one blur sigma for the batch, blur drawn even with BLUR off; the "
        "fix: per image, like ClassMix's",
    ),
    Quirk(
        "UDA.MIC.LAMBDA_ON_FUSED_LOSS",
        True,
        False,
        "C1",
        "MIC's lambda scales HRDA's fused term only; the fix: the whole MIC loss (equal at lambda 1)",
    ),
    Quirk(
        "UDA.GUIDANCE.WEIGHTING",
        "as_released",
        "mean",
        "G2",
        "Guidance Training's in-place aliasing of the pseudo-label weights (the released code; the logged run's "
        "older code: WEIGHTING logged); the fix: w = q mean(f)",
    ),
)

QUIRKS: Dict[str, Tuple[Quirk, ...]] = {
    "DACS": _DACS_FAMILY,
    "QuadMix": _DACS_FAMILY
    + (
        Quirk(
            "UDA.QUADMIX.REFERENCE_QUIRKS",
            True,
            False,
            "Q3",
            "the source mask may choose the ignore label, the target mask's exclusion by position, pasted objects "
            "keep the weight beneath; the fix: all three",
        ),
        Quirk(
            "UDA.QUADMIX.PASTE_NORMALIZATION",
            "as_released",
            "model",
            "Q1",
            "pasted rare objects in BGR order minus the RGB-order means, / 255; the fix: normalised as every image",
        ),
        Quirk(
            "UDA.QUADMIX.RESET_TEACHER",
            True,
            False,
            "Q2",
            "the teacher re-initialised from the student at the authors' resume iteration (RESET_TEACHER_ITER); the "
            "fix: it carries on",
        ),
        Quirk(
            "UDA.QUADMIX.RARE_OBJECTS_AS_RELEASED",
            True,
            False,
            "Q4",
            "rare objects of 2 list entries per iteration shared by every quad image, stretched to RARE_RESIZE, "
            "cropped, not flipped, a new image until the crop holds the class; the fix: each object's own class, the "
            "source pipeline",
        ),
    ),
    "DUDA": (
        Quirk(
            "UDA.DUDA.BATCH_NORM",
            "frozen_affine",
            "frozen_statistics",
            "D1",
            "BatchNorm: the release trains with batch statistics and frozen affine parameters; the fix keeps the "
            "warm-up's statistics (eval mode) and trains the affine parameters",
        ),
        Quirk(
            "UDA.DUDA.TEACHER_FORWARDS",
            "as_released",
            "eval",
            "D2",
            "the mean teacher's consistency target from train-mode forwards (batch statistics, dropout); the fix: "
            "one eval-mode forward",
        ),
        Quirk(
            "UDA.DUDA.TEACHER_BUFFERS",
            "student",
            "own",
            "D2",
            "the mean teacher's BatchNorm buffers copied from the student at each update (torch >= 1.13); the fix: "
            "its own",
        ),
        Quirk(
            "UDA.DUDA.RESAMPLE_AS_RELEASED",
            True,
            False,
            "D8",
            "logits carried to the crop then softmaxed, align_corners=True; the fix: probabilities, "
            "align_corners=False",
        ),
    ),
    "MCL": (
        Quirk(
            "UDA.MCL.TARGET_LOSS_REDUCTION",
            "batch_broadcast",
            "masked_mean",
            "M1",
            "the target CE terms' (B,h,w) x (B,1,h,w) broadcast, 2-4x the masked mean at batch 4; the fix: the "
            "masked mean",
        ),
        Quirk(
            "UDA.MCL.ENSEMBLE_ORDER",
            "own_first",
            "domain",
            "M7",
            "the ensemble head's target-side slots with the own style first, unlike its source side; the fix: "
            "domain order on both",
        ),
        Quirk(
            "UDA.MCL.COLOR_TRANSFER",
            "opencv_uint8",
            "float",
            "M10",
            "colour transfer in OpenCV's 8-bit L*a*b* with truncating casts; the fix: in floating point",
        ),
    ),
    "STAL": (
        Quirk(
            "UDA.STAL.ENTROPY_FILTER_AS_RELEASED",
            True,
            False,
            "A5",
            "the unlabelled pseudo-labels lose their most confident pixels; the fix (U2PL's rule): the most uncertain",
        ),
        Quirk(
            "UDA.STAL.CONTRASTIVE_DIVISOR_POWER",
            2,
            1,
            "A3",
            "the contrastive term divided by LOSS_DIVISOR twice (all-reduced, then / W / W); the fix: once, like the "
            "others",
        ),
        Quirk(
            "UDA.STAL.CONTRASTIVE_AS_RELEASED",
            True,
            False,
            "A2",
            "the contrastive samples as the release draws them (labels and probabilities read at different pixels, "
            "negatives of their own class, label_onehot's slot 0, queues paired by position); the fix: U2PL's paper",
        ),
        Quirk(
            "INPUT.SOURCE.CROP_PAD_LABEL",
            0,
            -1,
            "A1",
            "padded labelled pixels are road (the release forces ignore_label 0 in its Crop); the fix: ignored",
        ),
        Quirk("INPUT.TARGET.CROP_PAD_LABEL", 0, -1, "A1", "the same for the target's crops"),
        Quirk(
            "UDA.STAL.PASTE_RAW_SOURCE_LABELS",
            True,
            False,
            "A4",
            "a GTA5/SYNTHIA paste sample read raw (img_loader): its file's size and its label file's grey levels, so "
            "only GTA5's cars (as train) and trailers (as car) are ever pasted, SYNTHIA's never; the fix: stretched "
            "and mapped to trainIds like the labelled sample",
        ),
    ),
}


def quirks_of(meta_architecture: str) -> Tuple[Quirk, ...]:
    """The listed quirks of a method (none for a method without any)."""
    return QUIRKS.get(meta_architecture, ())


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg, key: str, value) -> None:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value


def apply_release_fidelity(cfg, command_line: Sequence[str] = ()) -> List[str]:
    """Resolve ``UDA.RELEASE_FIDELITY`` in place (see the module docstring): keys named in ``command_line``
    (``KEY VALUE ...``) keep their value. Returns one line per key it changed, for the log."""
    fidelity = cfg.UDA.RELEASE_FIDELITY
    if fidelity not in FIDELITIES:
        raise ValueError(f"UDA.RELEASE_FIDELITY must be one of {FIDELITIES[1:]} or '', not '{fidelity}'")
    if not fidelity:
        return []
    pinned = set(command_line[0::2])
    changes = []
    for quirk in quirks_of(cfg.MODEL.META_ARCHITECTURE):
        value = quirk.released if fidelity == "as_released" else quirk.fixed
        if quirk.key in pinned or _get(cfg, quirk.key) == value:
            continue
        changes.append(f"{quirk.key}: {_get(cfg, quirk.key)!r} -> {value!r} ({quirk.item}: {quirk.what})")
        _set(cfg, quirk.key, value)
    cfg.UDA.RELEASE_FIDELITY = ""
    return changes
