"""The GradientCheckpointing callback: per-block activation checkpointing during fit.

The logic lives in :mod:`lightning_sft.recipes.checkpointing`; see ``docs/memory_recipes.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_sft.callbacks.base import SFTCallback
from lightning_sft.callbacks.layer_dropout import LayerDropout
from lightning_sft.recipes.checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing



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
        if blocks is not None and (isinstance(blocks, str) or not all(isinstance(b, str) for b in blocks)):
            raise ValueError(
                f"`blocks` must be a list of dotted module paths such as ['model.layers']; got {blocks!r}."
            )
        self.block_paths = list(blocks) if blocks is not None else None
        self.checkpointed: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.checkpointed:
            return
        self.begin_setup(trainer, pl_module, stage)
        with _beneath_layer_dropout(trainer):
            self.checkpointed = enable_gradient_checkpointing(pl_module, self.block_paths)
        rank_zero_info(f"GradientCheckpointing: {len(self.checkpointed)} blocks recompute their forward in backward.")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.checkpointed:
            with _beneath_layer_dropout(trainer):
                disable_gradient_checkpointing(pl_module)
            self.checkpointed = []


@contextmanager
def _beneath_layer_dropout(trainer: pl.Trainer) -> Iterator[None]:
    """Change the blocks' forwards under any installed layer dropout: its droppers come off and go back
    on over the new forwards, so they decide before the checkpoint (whatever the callback order) and a
    recompute never re-decides, re-reports or replays a different set of rows."""
    droppers = [cb.dropper for cb in trainer.callbacks if isinstance(cb, LayerDropout) and cb.dropper is not None]
    for dropper in droppers:
        dropper.remove()
    try:
        yield
    finally:
        for dropper in droppers:
            for block in dropper.blocks:
                block.original = block.module.forward
            dropper.install()
