"""``CausalLM``: a minimal LightningModule around a Hugging Face causal language model.

It exists so the CLI has something to fine-tune out of the box; LoRA, sparsity and the efficiency
metrics are callbacks and work on any LightningModule, not just this one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

# Random-init models built from a config: no download, so smoke tests and CI run offline.
PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-llama": lambda: LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
}


def build_model(model: str) -> torch.nn.Module:
    """A random-init preset by name, or a local Hugging Face model directory (never the hub)."""
    if model in PRESETS:
        return AutoModelForCausalLM.from_config(PRESETS[model]())
    if Path(model).is_dir():
        return AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
    raise ValueError(
        f"Unknown model {model!r}: use a built-in preset ({', '.join(sorted(PRESETS))}) "
        "or a path to a local Hugging Face model directory (one holding config.json and the weights)."
    )


class CausalLM(pl.LightningModule):
    """Next-token-prediction fine-tuning of a Hugging Face causal LM held in ``self.model``.

    Args:
        model: a preset name from ``PRESETS`` (random weights) or a local Hugging Face model directory.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: optimizer steps of linear learning-rate warmup; 0 disables the scheduler.
    """

    def __init__(
        self, model: str = "tiny-llama", lr: float = 2e-4, weight_decay: float = 0.0, warmup_steps: int = 0
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}; use 0 for no warmup.")
        self.save_hyperparameters()
        self.model = build_model(model)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # HF shifts labels internally; positions labelled -100 are ignored.
        labels = batch.get("labels", batch["input_ids"])
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("test_loss", loss, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        # All parameters on purpose: frozen ones (e.g. under LoRA) never get a grad, so AdamW keeps
        # no state for them, and parameters unfrozen later by a callback are still optimized.
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        if warmup == 0:
            return optimizer
        scheduler = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
