"""The GradientCheckpointing callback: per-block activation checkpointing during fit.

The logic lives in :mod:`lightning_sft.recipes.checkpointing`; see ``docs/memory_recipes.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_sft.callbacks.base import SFTCallback, beneath_forward_wrappers
from lightning_sft.recipes.checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from lightning_sft.validation import check_block_paths



class GradientCheckpointing(SFTCallback):
    """Keep only each block's inputs for the backward pass and recompute the block there.

    Activation memory falls from every block's internals to one block input per block plus one block's
    internals at a time, for about one more forward pass of compute. Enabled in ``setup`` (for fit) and
    removed in ``teardown``, so the model leaves the fit as it came; nothing goes into checkpoints, and a
    resumed fit checkpoints again. Layer dropout stays outside the checkpoint in either callback order
    (a skipped block is not checkpointed, a kept one is recomputed on the rows it ran on).

    Args:
        blocks: dotted paths of the ``nn.ModuleList`` stacks of blocks; default: found by structure.

    Runs under every strategy: the checkpointed forwards are installed in ``setup``, before FSDP2
    (``configure_model``), FSDP or DeepSpeed wrap the blocks, so a sharded block is gathered again for
    its recompute in backward.
    """

    def __init__(self, blocks: Sequence[str] | None = None) -> None:
        super().__init__()
        self.block_paths = check_block_paths(blocks)
        self.checkpointed: list[str] = []

    def run_label(self) -> str:
        return "checkpointing"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.checkpointed:
            return
        self.begin_setup(trainer, pl_module, stage)
        with beneath_forward_wrappers(trainer):
            self.checkpointed = enable_gradient_checkpointing(pl_module, self.block_paths)
        rank_zero_info(f"GradientCheckpointing: {len(self.checkpointed)} blocks recompute their forward in backward.")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.checkpointed:
            with beneath_forward_wrappers(trainer):
                disable_gradient_checkpointing(pl_module)
            self.checkpointed = []
