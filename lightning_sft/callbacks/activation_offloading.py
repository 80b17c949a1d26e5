"""The ActivationOffloading callback: what each block saves for backward waits in host memory.

The logic lives in :mod:`lightning_sft.recipes.offload`; see ``docs/memory_recipes.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_sft.callbacks.base import ForwardWrapper, SFTCallback, beneath_forward_wrappers
from lightning_sft.recipes.offload import MIN_BYTES, OffloadedBlocks, Transfer, offload_activations
from lightning_sft.strategies import UNSHARDED
from lightning_sft.validation import check_block_paths, check_int

_MIB = 2**20


class ActivationOffloading(SFTCallback):
    """Move the tensors each block saves for backward to host memory in the forward pass, and bring them back,
    one block ahead, in the backward pass.

    On CUDA the copies go to pinned memory on a side stream, overlapping the blocks' compute; the device keeps
    about two blocks' activations instead of all of them, and the host holds the rest (logged as
    ``offload/host_gib``: the host RAM the fit needs). With ``GradientCheckpointing`` the checkpointed block
    inputs are what moves, in either callback order. On a CPU-only run it refuses: the activations are in
    host memory already. Installed in ``setup`` (fit), removed in ``teardown``.

    Example::

        trainer = pl.Trainer(accelerator="gpu", callbacks=[LoRA(r=16), ActivationOffloading()])

    Args:
        min_bytes: saved tensors smaller than this stay on the device (default 1 MiB).
        blocks: dotted paths of the ``nn.ModuleList`` stacks of blocks; default: found by structure.
        transfer: how tensors move (a ``recipes.offload.Transfer``); default: CUDA pinned memory on a side stream.
    """

    strategies = UNSHARDED
    strategy_refusal = (
        "under a sharded strategy the blocks' weights are gathered on streams of the strategy's own for the forward and"
        " again for backward, and offloading is not verified against them. Offload on one device or under DDP, or use"
        " FSDP's or DeepSpeed's own CPU offloading."
    )

    def __init__(
        self, min_bytes: int = MIN_BYTES, blocks: Sequence[str] | None = None, transfer: Transfer | None = None
    ) -> None:
        super().__init__()
        self.min_bytes = check_int(min_bytes, "min_bytes", 0, f"The default {MIN_BYTES} keeps tensors under 1 MiB.")
        self.block_paths = check_block_paths(blocks)
        self.transfer = transfer
        self._offloaded: OffloadedBlocks | None = None

    def run_label(self) -> str:
        return "offloading"

    def forward_wrappers(self) -> list[ForwardWrapper]:
        return [self._offloaded] if self._offloaded is not None else []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._offloaded is not None:
            return
        self.begin_setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        if self.transfer is None and device.type != "cuda":
            raise ValueError(
                f"ActivationOffloading moves activations from a CUDA GPU to host memory; this fit computes on {device.type},"
                " where they are in host memory already, so there is nothing to gain. Leave --offload-activations off"
                " here, or train on a GPU (--trainer.accelerator gpu)."
            )
        with beneath_forward_wrappers(trainer):
            self._offloaded = offload_activations(pl_module, device, self.transfer, self.min_bytes, self.block_paths)
        rank_zero_info(
            f"ActivationOffloading: {len(self._offloaded.blocks)} blocks keep what they save for backward in host memory"
            f" (tensors of {self.min_bytes / _MIB:g} MiB and more)."
        )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._offloaded is not None:
            self._offloaded.offloader.reset_counts()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._offloaded is not None:
            offloader = self._offloaded.offloader
            pl_module.log("offload/host_gib", offloader.host_peak / 2**30, on_step=True, on_epoch=False)
            pl_module.log("offload/moved_gib", offloader.moved_bytes / 2**30, on_step=True, on_epoch=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._offloaded is not None:
            with beneath_forward_wrappers(trainer, leaving=self._offloaded):
                self._offloaded = None
