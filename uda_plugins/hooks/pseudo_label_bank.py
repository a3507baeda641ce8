"""Keeps a meta-architecture's offline pseudo-label banks: restored with ``--resume``, filled when self-training
starts, rewritten after each optimizer step."""

from __future__ import annotations

from uda_plugins.d2 import CfgNode, HookBase

__all__ = ["PseudoLabelBankHook"]


class PseudoLabelBankHook(HookBase):
    """For a meta-architecture with ``pseudo_label_banks()``, ``initialize_bank(cfg)``,
    ``self_training_iteration(iteration)`` and ``commit_bank_update(cfg, iteration)`` (DUDA).

    * ``state_dict`` / ``load_state_dict``: the banks' version tables go into the checkpoint (Detectron2 loads hook
      state in ``resume_or_load``, before ``before_train``).
    * ``before_train``: each bank checks its folder is shared and removes files the restored state does not know.
    * ``before_step``: at the first self-training iteration of a bank without labels, fill it (a resumed bank is
      already filled).
    * ``after_step``: the method's rewrite of the bank (placed before the checkpointer, so a checkpoint holds it).
    """

    def __init__(self, model, cfg: CfgNode) -> None:
        self._model = model  # the unwrapped meta-architecture
        self._cfg = cfg
        self._banks = model.pseudo_label_banks()

    def before_train(self) -> None:
        for bank in self._banks:
            bank.open()

    def before_step(self) -> None:
        if self._model.self_training_iteration(self.trainer.iter) >= 0 and not all(b.initialized for b in self._banks):
            self._model.initialize_bank(self._cfg)

    def after_step(self) -> None:
        self._model.commit_bank_update(self._cfg, self.trainer.iter)
        storage = self.trainer.storage
        for k, bank in enumerate(self._banks):
            storage.put_scalar(
                f"bank{k}/stale_reads" if k else "bank/stale_reads", bank.stale_reads, smoothing_hint=False
            )

    def state_dict(self) -> dict:
        return {f"bank{k}": bank.state_dict() for k, bank in enumerate(self._banks)}

    def load_state_dict(self, state: dict) -> None:
        for k, bank in enumerate(self._banks):
            bank.load_state_dict(state[f"bank{k}"])
