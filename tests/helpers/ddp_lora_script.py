"""Run by test_lora_ddp: a 2-process CPU (gloo) DDP fit with the LoRA callback.

Each rank writes its trained adapter weights to OUT/rank{N}.safetensors.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import CausalLMModule, loader  # noqa: E402

from lightning_sft import LoRA  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    module = CausalLMModule()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=3, callbacks=[LoRA(r=4)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, loader())
    weights = {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    save_file(weights, str(out / f"rank{trainer.global_rank}.safetensors"))
