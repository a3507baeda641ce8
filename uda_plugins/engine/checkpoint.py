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

__all__ = ["UDACheckpointer", "UnreadableCheckpointError", "load_network"]

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


def load_network(cfg: CfgNode, network: str = "student") -> torch.nn.Module:
    """The network ``network`` (``student``, ``teacher``, ... as ``TEST.EVAL_MODEL`` names them) of the model
    ``cfg`` describes, with the weights of ``MODEL.WEIGHTS``, in eval mode: what a tool predicts with."""
    model = build_meta_arch(cfg)
    if cfg.MODEL.WEIGHTS:
        if not os.path.isfile(cfg.MODEL.WEIGHTS):
            raise FileNotFoundError(f"MODEL.WEIGHTS file '{cfg.MODEL.WEIGHTS}' does not exist")
        UDACheckpointer(model).load(cfg.MODEL.WEIGHTS, checkpointables=[])
    else:
        logger.warning("No MODEL.WEIGHTS: predicting with a randomly initialised model")
    networks = model.evaluable_models()
    if network not in networks:
        raise KeyError(f"Network '{network}': this method has only {sorted(networks)}")
    return networks[network].eval()
