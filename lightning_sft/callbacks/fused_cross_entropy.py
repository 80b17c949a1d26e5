"""The FusedCrossEntropy callback: a Hugging Face causal LM's training loss without its logits.

The logic lives in :mod:`lightning_sft.recipes.fused_loss` and :mod:`lightning_sft.losses`; see
``docs/memory_recipes.md``.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_sft.callbacks.base import SFTCallback
from lightning_sft.losses.liger import BACKENDS, Backend
from lightning_sft.recipes.fused_loss import FusedLoss, causal_lms, refusal
from lightning_sft.strategies import UNSHARDED
from lightning_sft.validation import check_int


class FusedCrossEntropy(SFTCallback):
    """Compute the loss of each causal LM given ``labels`` from its final hidden states and head, chunk by
    chunk of tokens, never holding the ``(tokens, vocab)`` logits or their gradient.

    Training forwards of the module's Hugging Face causal LMs (``*ForCausalLM`` and the like) return the same
    loss, and the same gradients, as the model's own (``logits=None``); evaluation, predict and calls
    without labels return real logits. LoRA on the head and tied embeddings keep working. Installed in
    ``setup`` (fit), removed in ``teardown``. A loss computed outside the model cannot be reached from
    here: call ``lightning_sft.losses.linear_cross_entropy`` in your ``training_step`` instead.

    Example::

        trainer = pl.Trainer(callbacks=[LoRA(r=16), FusedCrossEntropy()])

    Args:
        chunk_size: tokens per chunk of the torch loss; None: as many as make a chunk's logits about the hidden
            states' size (Liger's kernel sizes its chunks about so; a chunk_size set keeps the loss on torch).
        backend: "auto": Liger-Kernel's fused kernel on CUDA when it is installed (``pip install
            'lightning-sft[liger]'``) and the head is a plain linear one, the torch chunked loss otherwise (a
            LoRA head always: Liger's kernel takes one weight); "torch"; or "liger", refused in ``setup`` where
            it cannot run (CPU, not installed, a LoRA head), and here with a chunk_size.
    """

    strategies = UNSHARDED
    strategy_refusal = (
        "under a sharded strategy the head's weight is gathered only inside the head's own forward, which the"
        " fused loss does not call. Use it on one device or under DDP."
    )

    def __init__(self, chunk_size: int | None = None, backend: Backend = "auto") -> None:
        super().__init__()
        if chunk_size is not None:
            check_int(chunk_size, "chunk_size", 1, "Use None for the default chunk.")
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}. Use 'auto' for Liger-Kernel's"
                             " fused kernel on CUDA when it is installed and the torch loss elsewhere.")
        if backend == "liger" and chunk_size is not None:
            raise ValueError(f"`chunk_size`={chunk_size} sets the torch loss's chunks, and Liger's kernel sizes its"
                             " own. Leave chunk_size None with backend='liger', or pass backend='torch'.")
        self.chunk_size, self.backend = chunk_size, backend
        self._fused: FusedLoss | None = None

    def run_label(self) -> str:
        return "fused CE"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._fused is not None:
            return
        self.begin_setup(trainer, pl_module, stage)
        models = causal_lms(pl_module)
        if not models:
            raise ValueError(
                f"FusedCrossEntropy fuses the loss a Hugging Face causal LM computes from `labels`; {type(pl_module).__name__}"
                " holds none. If your training_step computes the loss itself, call"
                " lightning_sft.losses.linear_cross_entropy(hidden, head.weight, labels) there instead."
            )
        reasons = [why for why in map(refusal, models) if why is not None]
        if reasons:
            raise ValueError(f"FusedCrossEntropy cannot stand in for this loss: {reasons[0]}. Leave it off for this model.")
        fused = FusedLoss(models, self.chunk_size, self.backend)
        fused.check(trainer.strategy.root_device)  # the module moves to this device after setup
        self._fused = fused
        self._fused.install()
        rank_zero_info(f"FusedCrossEntropy: {len(models)} causal LM(s) compute their training loss without logits.")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._fused is not None:
            self._fused.remove()
            self._fused = None
