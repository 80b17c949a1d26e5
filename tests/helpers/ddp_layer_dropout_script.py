"""Run by test_layer_dropout: a 2-process CPU (gloo) DDP fit with LoRA + LayerDropout, Lightning's default
DDP settings (``find_unused_parameters=False``).

Each rank writes its trained adapter weights to OUT/rank{N}.safetensors and the blocks it dropped at each
step to OUT/rank{N}.txt. A dropped block's adapters take no part in the loss; the callback gives them a
zero-weighted term so DDP still sees every parameter used, and both processes drop the same blocks.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

from lightning_sft import LayerDropout, LoRA
from lightning_sft.data import RandomTokenData
from lightning_sft.modules import CausalLM


class _Drops(pl.Callback):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        dropout = next(cb for cb in trainer.callbacks if isinstance(cb, LayerDropout))
        self.lines.append(",".join(map(str, sorted(dropout.dropper.dropped))))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    drops = _Drops()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=6,
        callbacks=[LoRA(r=4), LayerDropout(rate=0.5, protect_first=0, protect_last=0), drops],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=RandomTokenData(seq_len=16, batch_size=4, num_train=48, num_val=8))
    weights = {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    save_file(weights, str(out / f"rank{trainer.global_rank}.safetensors"))
    (out / f"rank{trainer.global_rank}.txt").write_text("\n".join(drops.lines))
