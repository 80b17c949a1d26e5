"""Run by test_sparse_finetuning: a 2-process CPU (gloo) DDP fit with SparseFineTuning (Fisher selection and
one drop-and-regrow), Lightning's default DDP settings.

Each rank writes its trained deltas and their indices to OUT/rank{N}.safetensors. The ranks see different
batches, so their local gradient scores differ; the callback sums the scores over processes, so both must
select and regrow the same entries, and DDP keeps the values equal.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
from safetensors.torch import save_file

from lightning_sft import SparseFineTuning
from lightning_sft.data import RandomTokenData
from lightning_sft.modules import CausalLM

if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=6,
        callbacks=[SparseFineTuning(density=0.05, reselect_every=3, score_batches=2)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=RandomTokenData(seq_len=16, batch_size=4, num_train=48, num_val=8))
    tensors = {n: t.detach().contiguous() for n, t in module.state_dict().items() if n.endswith(("delta_values", "delta_indices"))}
    save_file(tensors, str(out / f"rank{trainer.global_rank}.safetensors"))
