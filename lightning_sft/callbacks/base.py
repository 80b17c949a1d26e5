"""``SFTCallback``: what every callback of this package shares.

- It declares the strategies it runs under (``strategies``, ``strategy_refusal``; see
  :mod:`lightning_sft.strategies`), checked for all of them by whichever sets up first.
- A fit that fails before training starts leaves the user's module as it was. The first of our
  callbacks to set up takes a restore point of the module and of every one of our callbacks
  (:mod:`lightning_sft.restore_point`); the first to see the exception restores it, whichever
  callback raised and in whichever order they were listed. Training starts at the first backward
  pass; from then on the module keeps what the fit made of it.
"""

from __future__ import annotations


import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_sft.restore_point import RestorePoint
from lightning_sft.strategies import ALL_KINDS, check_strategies

# Lightning's own attributes on a LightningModule (the trainer, the current hook, ...), which it keeps
# updating itself: a restore point leaves them alone.
_LIGHTNING_ATTRIBUTES = frozenset(vars(pl.LightningModule())) - frozenset(vars(nn.Module()))
# Where a Trainer holds its fit's restore point, while the fit has not started training.
_POINT = "_lightning_sft_restore_point"


class SFTCallback(Callback):
    """Base of this package's callbacks: declared strategies and the undo of a failed set-up.

    A subclass calls ``self.begin_setup(trainer, pl_module, stage)`` first in its ``setup``, before
    changing anything, and calls ``super()`` in the hooks below if it overrides them.
    """

    strategies: frozenset[str] = ALL_KINDS
    strategy_refusal: str = ""

    def begin_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse an unsupported strategy, then (once per fit) take the restore point."""
        check_strategies(trainer)
        if stage == "fit" and getattr(trainer, _POINT, None) is None:
            ours = [cb for cb in trainer.callbacks if isinstance(cb, SFTCallback)]
            setattr(trainer, _POINT, RestorePoint(pl_module, ours, keep_root=_LIGHTNING_ATTRIBUTES))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        setattr(trainer, _POINT, None)  # training has started: the module keeps what the fit does to it

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        setattr(trainer, _POINT, None)  # a fit that never trained (max_steps=0) ended normally

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        point = getattr(trainer, _POINT, None)
        setattr(trainer, _POINT, None)
        if point is not None:
            point.restore()
