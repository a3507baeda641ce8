"""Crash-safe checkpoints.

* Saving is atomic: a crash while saving never leaves a truncated file or a ``last_checkpoint`` pointing at one.
* Resuming survives a damaged newest checkpoint (truncated by a full disk, corrupted by a copy, deleted by hand):
  ``--resume`` tries the file ``last_checkpoint`` names, then the other ``model_*.pth`` of the run from the newest
  iteration down, and warns naming every file it skipped. It never silently starts from scratch: when every
  checkpoint of the run is unreadable it raises.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List

import torch

from uda_plugins.d2 import CfgNode, DetectionCheckpointer
from uda_plugins.methods import build_meta_arch
from uda_plugins.utils.file_io import atomic_open, atomic_write_text

__all__ = ["UDACheckpointer", "UnreadableCheckpointError", "load_evaluated_weights", "load_network"]

logger = logging.getLogger(__name__)

_PERIODIC = re.compile(r"^model_(\d+)\.pth$")


class UnreadableCheckpointError(OSError):
    """A checkpoint file is missing, truncated or not a checkpoint."""


class UDACheckpointer(DetectionCheckpointer):
    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_open(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def _load_model(self, checkpoint: Any):
        """Detectron2's loading (tensors of another shape or missing from the file keep their initialisation, each
        with a warning), plus one summary line; the keys are kept as ``last_incompatible`` for
        :func:`load_evaluated_weights`."""
        incompatible = super()._load_model(checkpoint)
        self.last_incompatible = incompatible
        missing = set(incompatible.missing_keys)
        if missing:
            reshaped = [k for k, *_ in incompatible.incorrect_shapes]
            self.logger.warning(
                f"{len(missing)} tensors of the model were not loaded and keep their initialisation: "
                f"{len(reshaped)} of another shape in the file ({_first(reshaped)}), {len(missing) - len(reshaped)} "
                f"not in it ({_first(sorted(missing - set(reshaped)))})"
            )
        return incompatible

    def _load_file(self, f: str) -> Dict[str, Any]:
        try:
            return super()._load_file(f)
        except Exception as e:  # torch.load raises many types on damaged files
            raise UnreadableCheckpointError(f"{f}: {type(e).__name__}: {e}") from e

    def resume_candidates(self) -> List[str]:
        """The run's checkpoints in the order ``--resume`` tries them: the one ``last_checkpoint`` names, then
        ``model_final.pth`` and the periodic ``model_<iter>.pth`` from the newest iteration down."""
        named = self.get_checkpoint_file()
        periodic = []
        for name in os.listdir(self.save_dir) if os.path.isdir(self.save_dir) else []:
            match = _PERIODIC.match(name)
            if match:
                periodic.append((int(match.group(1)), name))
            elif name == "model_final.pth":
                periodic.append((float("inf"), name))
        ordered = [os.path.join(self.save_dir, n) for _, n in sorted(periodic, reverse=True)]
        return [named] + [p for p in ordered if p != named] if named else ordered

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        skipped = []
        for candidate in self.resume_candidates():
            try:
                if not os.path.isfile(candidate):
                    raise UnreadableCheckpointError(f"{candidate} does not exist")
                checkpoint = self.load(candidate)
            except OSError as e:  # UnreadableCheckpointError, or another rank cannot see the file
                if hasattr(self, "_parsed_url_during_load"):
                    self._parsed_url_during_load = None  # Detectron2's load() leaves it set when it raises
                self.logger.warning(f"Cannot resume from {candidate} ({e}); trying the previous checkpoint")
                skipped.append(candidate)
                continue
            if skipped:
                self.logger.warning(f"Resumed from {candidate}; skipped unreadable {', '.join(skipped)}")
            return checkpoint
        raise UnreadableCheckpointError(
            f"--resume: no readable checkpoint in {self.save_dir} (tried {', '.join(skipped) or 'none'}). "
            "Remove the damaged files to start afresh, or point MODEL.WEIGHTS at a checkpoint without --resume."
        )


def _first(keys: List[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") if keys else "none"


def _evaluated_networks(model: torch.nn.Module, eval_model: str) -> Dict[str, torch.nn.Module]:
    networks = model.evaluable_models()
    names = sorted(networks) if eval_model == "both" else [eval_model]
    unknown = [n for n in names if n not in networks]
    if unknown:
        raise KeyError(f"TEST.EVAL_MODEL '{unknown[0]}': this method has only {sorted(networks)}")
    return {n: networks[n] for n in names}


def load_evaluated_weights(model: torch.nn.Module, path: str, eval_model: str, save_dir: str = "") -> None:
    """Load the checkpoint ``path`` into ``model`` (a meta-architecture) to evaluate or predict with its network
    ``eval_model`` (``TEST.EVAL_MODEL``: "student", "teacher", "both"): every parameter and persistent buffer of
    that network must come from the file, with its shape; otherwise one line names the first keys and shapes,
    instead of a score of randomly initialised weights. The networks that are not evaluated may be absent from the
    file (a source-only checkpoint has no teacher); the log says so once."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.WEIGHTS file '{path}' does not exist")
    checkpointer = UDACheckpointer(model, save_dir=save_dir)
    checkpointer.load(path, checkpointables=[])
    incompatible = checkpointer.last_incompatible
    prefix_of = {id(m): f"{n}." if n else "" for n, m in model.named_modules()}
    shapes = {k: (tuple(ckpt), tuple(ours)) for k, ckpt, ours in incompatible.incorrect_shapes}
    evaluated = _evaluated_networks(model, eval_model)
    prefixes = tuple(prefix_of[id(m)] for m in evaluated.values())
    missing = sorted(k for k in incompatible.missing_keys if k.startswith(prefixes))
    if missing:
        described = [
            f"{k} (file {shapes[k][0]}, model {shapes[k][1]})" if k in shapes else f"{k} (not in the file)"
            for k in missing[:3]
        ]
        raise ValueError(
            f"MODEL.WEIGHTS '{path}' does not fit the {' and '.join(evaluated)} network this config builds: "
            f"{len(missing)} of its tensors are missing or of another shape, e.g. {'; '.join(described)}. "
            "Check MODEL.SEM_SEG_HEAD.NUM_CLASSES, the backbone and the head against the config that wrote it"
        )
    others = sorted({k.split(".")[0] for k in incompatible.missing_keys})
    if others:
        logger.info(f"MODEL.WEIGHTS holds nothing for {', '.join(others)}: not evaluated, left as initialised")


def load_network(cfg: CfgNode, network: str = "student") -> torch.nn.Module:
    """The network ``network`` (``student``, ``teacher``, ... as ``TEST.EVAL_MODEL`` names them) of the model
    ``cfg`` describes, with the weights of ``MODEL.WEIGHTS`` (all of them: :func:`load_evaluated_weights`), in eval
    mode: what a tool predicts with."""
    model = build_meta_arch(cfg)
    if cfg.MODEL.WEIGHTS:
        load_evaluated_weights(model, cfg.MODEL.WEIGHTS, network)
    else:
        logger.warning("No MODEL.WEIGHTS: predicting with a randomly initialised model")
    return _evaluated_networks(model, network)[network].eval()
