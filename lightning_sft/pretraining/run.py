"""Pretraining of the shipped base model with our own Lightning stack: corpus, tokenizer, packed blocks, fit.

``lightning-sft pretrain`` (:mod:`lightning_sft.cli.pretrain`) runs :func:`pretrain`.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import transformers
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_sft.callbacks import EfficiencyMonitor
from lightning_sft.modules import CausalLM
from lightning_sft.pretraining.corpus import build_corpus
from lightning_sft.pretraining.tokenizer import train_tokenizer


class _Blocks(torch.utils.data.Dataset):
    """Fixed-length blocks of the packed token stream, as causal-LM batches."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def pack(documents: list[str], tokenizer: transformers.PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut the stream into (n, seq_len) blocks."""
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer(document).input_ids)
        stream.append(tokenizer.eos_token_id)
    usable = len(stream) // seq_len * seq_len
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, seq_len)


def pretrain(
    out_dir: Path,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int,
    number_lines: int,
    vocab_size: int,
    val_interval: int,
) -> dict:
    pl.seed_everything(seed)
    started = time.time()
    documents = build_corpus(number_lines=number_lines, seed=seed)
    tokenizer = train_tokenizer(documents, vocab_size=vocab_size)
    blocks = pack(documents, tokenizer, seq_len)
    n_val = max(8, len(blocks) // 100)
    train, val = blocks[:-n_val], blocks[-n_val:]

    module = CausalLM(model="llama-5m", lr=lr, weight_decay=0.1, warmup_steps=max(1, steps // 20), decay_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=1.0,
        val_check_interval=min(val_interval, steps),
        check_val_every_n_epoch=None,
        log_every_n_steps=10,
        logger=CSVLogger(out_dir / "logs", name="pretrain"),
        callbacks=[EfficiencyMonitor()],
        enable_checkpointing=False,
    )
    trainer.fit(
        module,
        DataLoader(_Blocks(train), batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(_Blocks(val), batch_size=batch_size),
    )
    train_loss = float(trainer.callback_metrics["train_loss"])
    val_loss = trainer.validate(module, DataLoader(_Blocks(val), batch_size=batch_size), verbose=False)[0]["val_loss"]

    module.model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    record = {
        "corpus": {
            "documents": len(documents),
            "characters": sum(map(len, documents)),
            "tokens": int(blocks.numel()),
            "train_blocks": len(train),
            "val_blocks": len(val),
            "number_lines": number_lines,
        },
        "tokenizer": {"type": "byte-level BPE, single-digit tokens", "vocab_size": len(tokenizer)},
        "model": {"preset": "llama-5m", "parameters": sum(p.numel() for p in module.parameters())},
        "training": {
            "steps": steps,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "tokens_seen": steps * batch_size * seq_len,
            "peak_lr": lr,
            "schedule": "linear warm-up 5%, cosine to 10%",
            "optimizer": "AdamW, weight decay 0.1, grad clip 1.0",
            "final_train_loss": train_loss,
            "val_loss": float(val_loss),
            "wall_clock_s": round(time.time() - started, 1),
            "seed": seed,
        },
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "machine": platform.machine()},
    }
    (out_dir / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
