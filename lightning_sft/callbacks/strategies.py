"""The strategies the callbacks refuse: sharded ones wrap and flatten parameters and restore
checkpoints after wrapping, which module swaps, adapter structures and optimizer swaps cannot follow."""

from __future__ import annotations

import lightning.pytorch as pl

SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def sharded_strategy(trainer: pl.Trainer) -> str | None:
    """The name of the Trainer's strategy if it is a sharded one, else None."""
    name = type(trainer.strategy).__name__
    return name if name in SHARDED_STRATEGIES else None
