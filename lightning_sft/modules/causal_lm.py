"""``CausalLM``: a minimal LightningModule around a Hugging Face causal language model.

It exists so the CLI has something to fine-tune out of the box; LoRA, sparsity and the efficiency
metrics are callbacks and work on any LightningModule, not just this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from lightning_sft.assets import SHIPPED_MODELS, resolve_model_dir
from lightning_sft.sharding import has_sharded_parameters, shard_by_block
from lightning_sft.tasks.exact_match import ResponseExactMatch

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
    # The architecture of the shipped pretrained base (see docs/base_model.md), random-init.
    "llama-5m": lambda: LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}


def build_model(model: str) -> torch.nn.Module:
    """A shipped pretrained model by name, a random-init preset, or a local HF model directory (never the hub)."""
    if model in PRESETS:
        return AutoModelForCausalLM.from_config(PRESETS[model]())
    directory = resolve_model_dir(model)
    if directory is not None:
        return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    raise ValueError(
        f"Unknown model {model!r}: use a shipped model ({', '.join(sorted(SHIPPED_MODELS))}), a random-init preset"
        f" ({', '.join(sorted(PRESETS))}), or a path to a local Hugging Face model directory (config.json + weights)."
    )


SUMMARY_TOKENS = 64


class CausalLM(pl.LightningModule):
    """Next-token-prediction fine-tuning of a Hugging Face causal LM held in ``self.model``.

    Args:
        model: a shipped pretrained model (``sft-llama-5m``), a random-init preset from ``PRESETS``, or a
            local Hugging Face model directory.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: optimizer steps of linear learning-rate warmup.
        decay_steps: if set, the learning rate follows a cosine from its peak after warm-up down to
            10% at this step (and stays there); ``None`` keeps it constant after warm-up.
    """

    def __init__(
        self,
        model: str = "sft-llama-5m",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        decay_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}; use 0 for no warmup.")
        if decay_steps is not None and (not isinstance(decay_steps, int) or decay_steps <= warmup_steps):
            raise ValueError(f"decay_steps must be an int > warmup_steps ({warmup_steps}) or None, got {decay_steps!r}.")
        self.save_hyperparameters()
        # from_pretrained returns eval mode; Lightning keeps module modes as they are, so switch explicitly.
        self.model = build_model(model).train()
        # Exact match of the response tokens (labels != -100); see ResponseExactMatch.
        self.val_accuracy = ResponseExactMatch()
        self.test_accuracy = ResponseExactMatch()
        # What Lightning's model summary runs to show layer sizes and FLOPs: one sequence of 64 tokens.
        self.example_input_array = torch.zeros(1, SUMMARY_TOKENS, dtype=torch.long)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)`` of token ids ``(batch, seq)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # HF shifts labels internally; positions labelled -100 are ignored.
        labels = batch.get("labels", batch["input_ids"])
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels)
        return out.loss, out.logits, labels

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._forward(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, accuracy: ResponseExactMatch) -> torch.Tensor:
        loss, logits, labels = self._forward(batch)
        accuracy.update(logits, labels)
        size = batch["input_ids"].shape[0]
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log(f"{stage}_acc", accuracy, prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test", self.test_accuracy)

    def configure_model(self) -> None:
        """Under ``strategy="fsdp2"`` (or a ``ModelParallelStrategy``), shard the model block by block
        over the data-parallel ranks; after the callbacks' ``setup``, so adapters are sharded with it."""
        mesh = self.device_mesh
        if mesh is None or has_sharded_parameters(self.model):  # not model-parallel, or sharded by an earlier fit
            return
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise RuntimeError(
                "CausalLM shards with FSDP2 only, and this ModelParallelStrategy puts"
                f" {mesh['tensor_parallel'].size()} processes in its tensor-parallel dimension: use strategy='fsdp2',"
                " or ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1)."
            )
        shard_by_block(self.model, mesh["data_parallel"])

    def configure_optimizers(self) -> Any:
        # The trainable parameters only: the optimizer holds no reference to the frozen base.
        trainable = [param for param in self.parameters() if param.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup, decay = self.hparams.warmup_steps, self.hparams.get("decay_steps")
        if warmup == 0 and decay is None:
            return optimizer
        scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, warmup, decay))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_factor(step: int, warmup: int, decay: int | None) -> float:
    """Linear warm-up to 1, then (if ``decay``) a cosine down to 0.1 at step ``decay``."""
    if step < warmup:
        return (step + 1) / warmup
    if decay is None:
        return 1.0
    progress = min(1.0, (step - warmup) / (decay - warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
