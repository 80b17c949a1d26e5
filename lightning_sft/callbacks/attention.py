"""The AttentionImplementation callback: the attention kernel of the module's Hugging Face models.

The logic lives in :mod:`lightning_sft.recipes.attention`; see ``docs/memory_recipes.md``.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_sft.callbacks.base import SFTCallback
from lightning_sft.recipes.attention import check_implementation, set_attention_implementation


class AttentionImplementation(SFTCallback):
    """Run the module's Hugging Face models with ``implementation`` for the length of each stage.

    ``sdpa`` (the default) keeps no ``batch x heads x seq x seq`` attention probabilities for the backward
    pass, as ``eager`` does; ``flash_attention_2`` needs a CUDA GPU and the flash-attn package. Set in
    ``setup`` (fit, validate, test), put back in ``teardown``. Refused at ``setup`` for a module without
    a transformers model or a family without the implementation, before any training.

    Args:
        implementation: ``eager``, ``sdpa``, ``flex_attention``, ``flash_attention_2`` or ``flash_attention_3``.
    """

    def __init__(self, implementation: str = "sdpa") -> None:
        super().__init__()
        self.implementation = check_implementation(implementation)
        self._previous: str | None = None

    def run_label(self) -> str:
        return f"attention {self.implementation}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.begin_setup(trainer, pl_module, stage)
        if self._previous is not None:
            return
        self._previous = set_attention_implementation(pl_module, self.implementation)
        if self._previous != self.implementation:
            rank_zero_info(f"AttentionImplementation: {self._previous} -> {self.implementation} attention.")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            set_attention_implementation(pl_module, self._previous)
            self._previous = None
