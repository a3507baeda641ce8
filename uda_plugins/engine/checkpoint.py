"""Checkpoints written atomically: a crash while saving never leaves a truncated file or a ``last_checkpoint``
pointing at one."""

from __future__ import annotations

import os

import torch

from uda_plugins.d2 import DetectionCheckpointer
from uda_plugins.utils.file_io import atomic_open, atomic_write_text

__all__ = ["UDACheckpointer"]


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
