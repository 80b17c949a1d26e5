"""Short CPU fits of the tiny LLaMA on random tokens, shared by the callback tests."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from lightning_sft.data import RandomTokenData
from lightning_sft.modules import CausalLM


def tiny_data(num_train: int = 24) -> RandomTokenData:
    return RandomTokenData(seq_len=16, batch_size=4, num_train=num_train, num_val=8)


def tiny_trainer(root: Path, steps: int, callbacks: list[pl.Callback], **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer for ``steps`` steps: no logger, no checkpoints and no validation unless asked."""
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("limit_val_batches", 0)
    return pl.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", callbacks=callbacks, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def tiny_fit(
    root: Path, steps: int, callbacks: list[pl.Callback], ckpt_path: Path | None = None, num_train: int = 24, **kwargs
) -> CausalLM:
    """Seed 0, a fresh tiny-llama ``CausalLM``, ``steps`` steps; checkpointing on when a ModelCheckpoint is given."""
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    checkpointing = any(isinstance(cb, pl.callbacks.ModelCheckpoint) for cb in callbacks)
    tiny_trainer(root, steps, callbacks, enable_checkpointing=checkpointing, **kwargs).fit(
        module, datamodule=tiny_data(num_train), ckpt_path=ckpt_path
    )
    return module
