"""The EightBitOptimizer callback: the module's optimizers swapped for their bitsandbytes 8-bit counterparts.

The logic lives in :mod:`lightning_sft.recipes.optimizers`; see ``docs/memory_recipes.md``.
"""

from __future__ import annotations

import importlib.util
from types import MappingProxyType

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_sft.callbacks.base import SFTCallback
from lightning_sft.recipes.optimizers import (
    DEFAULT_MIN_8BIT_SIZE,
    eight_bit_optimizer,
    is_bitsandbytes_optimizer,
    rebind_scheduler,
)
from lightning_sft.strategies import UNSHARDED
from lightning_sft.validation import check_int



class EightBitOptimizer(SFTCallback):
    """Keep Adam / AdamW / SGD-momentum states in 8 bits: about 2 bytes per trained parameter instead of 8.

    ``configure_optimizers`` stays as it is: in ``on_fit_start`` (after it ran, before a checkpoint's
    optimizer state is loaded, so a resumed 8-bit state loads into an 8-bit optimizer) each optimizer is
    replaced by ``eight_bit_optimizer(optimizer)`` with the same groups and hyperparameters, and the LR
    schedulers are pointed at the replacement. Optimizers that are bitsandbytes ones already are kept.
    Works with automatic and manual optimization (``self.optimizers()`` returns the replacements).

    Args:
        min_8bit_size: tensors with fewer elements keep fp32 states (bitsandbytes' default, 4096).
    """

    # Regrowth zeroes the regrown entries' fp32 states in place; in 8-bit states code 0 is not zero.
    excludes_when = MappingProxyType({"SparseFineTuning": (
        "reselect_every",
        "SparseFineTuning(reselect_every=...) resets the optimizer state of regrown entries in place, and an 8-bit"
        " code 0 is not 0: use reselect_every=None, or keep the fp32 optimizer.",
    )})
    strategies = UNSHARDED
    strategy_refusal = (
        "bitsandbytes' 8-bit optimizers run their kernels on plain tensors, and a sharded strategy's parameters are"
        " DTensors (FSDP2), flat shards (FSDP) or DeepSpeed's own optimizer's. Keep the fp32 optimizer there (its"
        " states are sharded too), or use strategy='ddp'."
    )

    def __init__(self, min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE) -> None:
        super().__init__()
        self.min_8bit_size = check_int(min_8bit_size, "min_8bit_size", 0, "bitsandbytes' default is 4096.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError("EightBitOptimizer needs bitsandbytes: `pip install bitsandbytes` (CPU and CUDA).")

    def run_label(self) -> str:
        return "8-bit optimizer"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.begin_setup(trainer, pl_module, stage)

    def conflict_with(self, other: SFTCallback) -> str | None:
        name = type(other).__name__
        if name in self.excludes_when and getattr(other, "reselect_every", None) is not None:
            return self.excludes_when[name][1]
        return super().conflict_with(other)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Again, for optimizers another callback rebuilt after this one's on_fit_start (AdaptiveRankSearch).
        self._convert(trainer)

    def _convert(self, trainer: pl.Trainer) -> None:
        """Swap every optimizer that is not a bitsandbytes one; all are converted before any is swapped."""
        old = list(trainer.strategy.optimizers)
        new = [opt if is_bitsandbytes_optimizer(opt) else eight_bit_optimizer(opt, self.min_8bit_size) for opt in old]
        swapped = [(before, after) for before, after in zip(old, new) if before is not after]
        if not swapped:
            return
        for config in trainer.lr_scheduler_configs:
            for before, after in swapped:
                rebind_scheduler(config.scheduler, before, after)
        trainer.strategy.optimizers = new
        names = ", ".join(f"{type(before).__name__} -> {type(after).__name__}" for before, after in swapped)
        rank_zero_info(f"EightBitOptimizer: {names} (fp32 states below {self.min_8bit_size} elements).")
