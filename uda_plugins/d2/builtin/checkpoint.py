"""Detectron2's ``DetectionCheckpointer``: fvcore's Checkpointer that saves on the main process only and
checks, under DDP, that every rank can read the file it is asked to load."""

from __future__ import annotations

import logging
import os

from fvcore.common.checkpoint import Checkpointer
from torch.nn.parallel import DistributedDataParallel

from . import comm

__all__ = ["DetectionCheckpointer"]


class DetectionCheckpointer(Checkpointer):
    def __init__(self, model, save_dir: str = "", *, save_to_disk=None, **checkpointables) -> None:
        super().__init__(
            model,
            save_dir,
            save_to_disk=comm.is_main_process() if save_to_disk is None else save_to_disk,
            **checkpointables,
        )

    def load(self, path: str, *args, **kwargs) -> dict:
        need_sync = False
        logger = logging.getLogger(__name__)
        logger.info("[DetectionCheckpointer] Loading from {} ...".format(path))
        if path and isinstance(self.model, DistributedDataParallel):
            has_file = os.path.isfile(path)
            all_has_file = comm.all_gather(has_file)
            if not all_has_file[0]:
                raise OSError(f"File {path} not found on main worker.")
            if not all(all_has_file):
                logger.warning(f"Not all workers can read checkpoint {path}. Training may fail to fully resume.")
                need_sync = True
            if not has_file:
                path = None
        ret = super().load(path, *args, **kwargs)
        if need_sync:
            logger.info("Broadcasting model states from main worker ...")
            self.model._sync_params_and_buffers()
        return ret
