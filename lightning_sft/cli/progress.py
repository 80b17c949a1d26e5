"""The fit's progress bar counts optimizer steps of ``max_steps`` on a step-bounded run.

Lightning's bars count batches per epoch, so a run bounded by ``max_steps`` (``max_epochs=-1``)
reads "Epoch 2/-2 ... 100/100" and never says how far the run is. This bar reads
"Step ... 350/600" over the whole fit, and is Lightning's own otherwise.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


def step_bound(trainer: pl.Trainer) -> bool:
    """Whether ``max_steps`` ends the fit (rather than an epoch count)."""
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar whose training bar shows steps of ``max_steps`` on a step-bounded fit.

    Example::

        Trainer(max_steps=600, callbacks=[StepProgressBar()])  # "Step ... 350/600"
    """

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if step_bound(self.trainer) else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not step_bound(self.trainer):
            return super()._get_train_description(current_epoch)
        return f"{'Step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if step_bound(trainer):  # the bar runs over the whole fit: an epoch does not restart it
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if step_bound(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)
            self.refresh()
