"""Run by test_rank_search: a 2-process CPU (gloo) DDP fit with LoRA + AdaptiveRankSearch(per_module=True).

Each rank writes its trained adapter weights to OUT/rank{N}.safetensors and to OUT/rank{N}.json its
search record, the ranks its adapters ended with and the token ids of its first training batch.

The DistributedSampler gives the processes different batches, in the trials as in the fit, so each
process alone would measure other losses and importances; the search averages gradients and
validation losses over the processes, so both make the same choice and build the same adapters.
"""

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from safetensors.torch import save_file

from lightning_sft import AdaptiveRankSearch, LoRA, lora_layers
from lightning_sft.data import RandomTokenData
from lightning_sft.modules import CausalLM


class _FirstBatch(pl.Callback):
    def __init__(self) -> None:
        self.ids: list[int] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.ids is None:
            self.ids = batch["input_ids"][0].tolist()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    # penalty 1: the smallest rank wins, and its budget is spread over the modules by importance.
    search = AdaptiveRankSearch(candidates=(2, 4, 8), trial_steps=2, val_batches=1, penalty=1.0, per_module=True)
    first = _FirstBatch()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=3, callbacks=[LoRA(r=4), search, first],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    # 48 sequences, 2 processes, batches of 4: 6 batches per process per epoch, as round 2 (6 steps) needs.
    trainer.fit(module, datamodule=RandomTokenData(seq_len=16, batch_size=4, num_train=48, num_val=8))
    weights = {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    rank = trainer.global_rank
    save_file(weights, str(out / f"rank{rank}.safetensors"))
    layer_ranks = {name: layer.r for name, layer in lora_layers(module).items()}
    (out / f"rank{rank}.json").write_text(json.dumps({"record": search.record, "layer_ranks": layer_ranks,
                                                        "first_ids": first.ids}))
