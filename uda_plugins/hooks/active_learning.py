"""Active-learning rounds inside one training run (STAL / ILM-ASSL's loop without restarts).

At each iteration of ``UDA.ACTIVE.ROUND_ITERS`` the hook scores every image of ``DATASETS.TARGET_TRAIN[0]`` with the
model (its teacher if it has one: the mean normalised pixel entropy), picks ``ROUND_IMAGES`` more by
``STRATEGY`` with per-city quotas (:mod:`uda_plugins.active_learning.selection`), reveals their ground truth
(:class:`~uda_plugins.active_learning.annotation.GroundTruthAnnotator`) and rebuilds the training loader so the
labelled pool (the seed set of ``DATASETS.TARGET_LABELED_LIST`` plus every round's images) feeds the source stream
from the next iteration on.

* Files: ``OUTPUT_DIR/active_learning/round<k>.txt`` (the round's images) and ``labelled_after_round<k>.txt`` (the
  whole pool, a ``DATASETS.TARGET_LABELED_LIST`` for the restart-per-round protocol), written atomically.
* State: the round in which each target image was labelled (0 = not labelled) goes into the checkpoint; the hook
  runs before the checkpointer, so a checkpoint holds its iteration's round, and ``--resume`` rebuilds the loader
  with the restored pool: a resumed run never selects a round again nor forgets one.
* Distributed: every process scores its shard, the scores are gathered, and every process makes the same
  selection (the random strategy draws from a generator seeded by (seed, round)).

People cannot label in the middle of a run; the folder annotator is for ``tools/active_learning_round.py``.
"""

from __future__ import annotations

import logging
import os
from typing import List

import numpy as np
import torch

from uda_plugins.active_learning.selection import group_of, image_entropy, select_images
from uda_plugins.d2 import CfgNode, HookBase, comm
from uda_plugins.data.build import (
    build_full_view_loader,
    build_uda_train_loader,
    get_dataset_dicts,
    image_subset,
)
from uda_plugins.data.image_lists import write_image_list
from uda_plugins.modeling.inference import predict_full_views

__all__ = ["ActiveLearningHook"]

logger = logging.getLogger(__name__)


class ActiveLearningHook(HookBase):
    def __init__(self, cfg: CfgNode, model) -> None:
        a = cfg.UDA.ACTIVE
        if len(a.ROUND_ITERS) != len(a.ROUND_IMAGES):
            raise ValueError(
                f"UDA.ACTIVE.ROUND_ITERS {tuple(a.ROUND_ITERS)} and ROUND_IMAGES {tuple(a.ROUND_IMAGES)} must pair up"
            )
        if not cfg.DATASETS.TARGET_TRAIN:
            raise ValueError("Active-learning rounds select images of DATASETS.TARGET_TRAIN[0], which is empty")
        self._cfg = cfg
        self._model = model  # the unwrapped meta-architecture
        self.rounds = {int(it): int(n) for it, n in zip(a.ROUND_ITERS, a.ROUND_IMAGES)}
        self.strategy, self.quota_rule, self.network = a.STRATEGY, a.QUOTA_RULE, a.NETWORK
        self.target = cfg.DATASETS.TARGET_TRAIN[0]
        self.folder = os.path.join(cfg.OUTPUT_DIR, "active_learning")
        self.dicts = get_dataset_dicts([self.target])
        self.groups = [group_of(d["file_name"]) for d in self.dicts]
        self.labelled_in_round = torch.zeros(len(self.dicts), dtype=torch.int64)
        self._restored = False

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"labelled_in_round": self.labelled_in_round.clone()}

    def load_state_dict(self, state: dict) -> None:
        restored = state["labelled_in_round"]
        if restored.shape != self.labelled_in_round.shape:
            raise ValueError(
                f"The checkpoint's active-learning state covers {restored.numel()} target images, "
                f"'{self.target}' has {len(self.dicts)}: was DATASETS.TARGET_TRAIN changed?"
            )
        self.labelled_in_round.copy_(restored)
        self._restored = True

    # ------------------------------------------------------------------------------------------ hooks
    def before_train(self) -> None:
        if not self._restored:
            seed_set = self._cfg.DATASETS.TARGET_LABELED_LIST
            if seed_set:
                indices = image_subset(seed_set, self.dicts, self.trainer.data_loader.seed)
                self.labelled_in_round[indices] = 1
            return
        done = int(self.labelled_in_round.max()) - 1
        if done > 0:  # a resumed run: train on the pool as it was at the checkpoint
            logger.info("Active learning: resuming after round %d with %d labelled images", done, self.num_labelled)
            self._use_pool(done, self.trainer.iter)

    @property
    def num_labelled(self) -> int:
        return int((self.labelled_in_round > 0).sum())

    def after_step(self) -> None:
        upcoming = self.trainer.iter + 1
        if upcoming not in self.rounds:
            return
        k = sorted(self.rounds).index(upcoming) + 1
        scores = self._scores() if self.strategy != "random" else None
        rng = np.random.default_rng([int(self.trainer.data_loader.seed) & 0xFFFFFFFF, k])
        picked = select_images(
            self.rounds[upcoming],
            self.groups,
            (self.labelled_in_round > 0).numpy(),
            self.strategy,
            scores,
            rng,
            self.quota_rule,
        )
        self.labelled_in_round[picked] = k + 1
        logger.info(
            "Active learning round %d after iteration %d: %d images (%s), %d labelled in all",
            k,
            self.trainer.iter,
            len(picked),
            self.strategy,
            self.num_labelled,
        )
        if comm.is_main_process():
            write_image_list(os.path.join(self.folder, f"round{k}.txt"), self.dicts, picked)
        self._use_pool(k, upcoming)
        self.trainer.storage.put_scalar("active/labelled_images", self.num_labelled, smoothing_hint=False)

    # ---------------------------------------------------------------------------------------- pieces
    def _scores(self) -> np.ndarray:
        networks = self._model.evaluable_models()
        network = networks.get(self.network) or networks["student"]
        per_rank = max(1, self._cfg.SOLVER.IMS_PER_BATCH_TARGET // comm.get_world_size())
        loader = build_full_view_loader(self._cfg, self.target, per_rank)
        local: List = []
        size = self._cfg.UDA.ACTIVE.SCORE_INPUT_SIZE
        for indices, probs in predict_full_views(network, loader, self._model.student.normalize, size):
            local += list(zip(indices, image_entropy(probs).cpu().tolist()))
        scores = np.zeros(len(self.dicts))
        for part in comm.all_gather(local) if comm.get_world_size() > 1 else [local]:
            for index, score in part:
                scores[index] = score
        return scores

    def _use_pool(self, round_index: int, start_iter: int) -> None:
        """Write the pool's list file and train on it from ``start_iter`` on."""
        path = os.path.join(self.folder, f"labelled_after_round{round_index}.txt")
        pool = torch.nonzero(self.labelled_in_round).flatten().tolist()
        if comm.is_main_process():
            write_image_list(path, self.dicts, pool)
        comm.synchronize()  # every process reads the file the main process wrote
        cfg = self._cfg.clone()
        cfg.defrost()
        cfg.DATASETS.TARGET_LABELED_LIST = path
        old = self.trainer.data_loader
        loader = build_uda_train_loader(cfg, self._model.data_requirements, seed=old.seed)
        loader.serve_banks_of(self._model)
        loader.set_start_iter(start_iter)
        self.trainer._trainer.reset_data_loader(lambda: loader)
