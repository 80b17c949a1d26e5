"""Run by test_contextual_sparsity_resume_ddp: a 2-process CPU (gloo) DDP fit with LoRA + ContextualSparsity
(calibrated estimators, mlp_sparsity="auto").

Each rank writes its trained adapter weights to OUT/rank{N}.safetensors and what the sparsity callback
saw to OUT/rank{N}.json: steps that ran sparse, the FLOPs skipped per step, the last ``sparsity/mean``
from ``trainer.callback_metrics`` and the first token ids of its first micro-batch.

Each rank's ContextualSparsity selects channels from that rank's own micro-batch (the DistributedSampler
gives the ranks different sequences), so the sparse forwards and the local gradients differ between
ranks. DDP all-reduces (averages) the LoRA gradients before the optimizer step, so both ranks still
apply the same update and end with identical adapters.
"""

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file

from lightning_sft import ContextualSparsity, LoRA
from lightning_sft.data import RandomTokenData
from lightning_sft.modules import CausalLM


def _all_context(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


class _Record(pl.Callback):
    """Reads the sparsity callback's state after each forward (before backward, so the order of the
    callbacks does not matter)."""

    def __init__(self, sparsity: ContextualSparsity) -> None:
        self.sparsity = sparsity
        self.sparse_steps = 0
        self.skipped_flops: list[float] = []
        self.first_input_ids: list[int] | None = None
        self.estimator_sums: dict[str, list[float]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.first_input_ids is None:
            self.first_input_ids = batch["input_ids"][0].tolist()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        estimators = self.sparsity.state_dict()["estimators"]
        self.estimator_sums = {key: [float(t.double().sum()) for t in state.values()] for key, state in estimators.items()}

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self.sparse_steps += int(self.sparsity.state.active)
        self.skipped_flops.append(float(self.sparsity.state.skipped_flops))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    # Two dense warm-up steps calibrate the estimators and choose the "auto" MLP sparsity from
    # statistics summed over both ranks; three sparse steps follow.
    sparsity = ContextualSparsity("svd", "auto", 0.5, dense_layers=(), dense_warmup=2, calibration_steps=2,
                                  token_mask_fn=_all_context)
    record = _Record(sparsity)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=5, callbacks=[LoRA(r=4), sparsity, record],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    # 24 sequences, 2 ranks, batches of 4: 3 steps per rank per epoch.
    trainer.fit(module, datamodule=RandomTokenData(seq_len=16, batch_size=4, num_train=24, num_val=4))
    weights = {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    rank = trainer.global_rank
    save_file(weights, str(out / f"rank{rank}.safetensors"))
    report = {
        "global_rank": rank,
        "world_size": trainer.world_size,
        "sparse_steps": record.sparse_steps,
        "skipped_flops": record.skipped_flops,
        "sparsity_mean": float(trainer.callback_metrics["sparsity/mean"]),
        "first_input_ids": record.first_input_ids,
        "auto_sparsity": sparsity.auto_sparsity,
        "estimator_sums": record.estimator_sums,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
