"""Every callback under sharded strategies, one launch for all cases: run by test_fsdp2 on CPU (2 gloo
processes, FSDP2 and DDP), and by hand on CUDA for FSDP1 and DeepSpeed (docs/distributed.md)::

    python tests/helpers/sharded_cases.py OUT                      # CPU: FSDP2, with DDP references
    python tests/helpers/sharded_cases.py OUT --accelerator gpu --devices 2 \
        --strategies fsdp2,fsdp,deepspeed_stage_2,deepspeed_stage_3 --compare

Rank 0 writes ``OUT/<case>-<strategy>.json`` (the loss of every step, averaged over the processes, and
case facts; or the refusal's message) and ``OUT/<case>-<strategy>.safetensors`` (the trained tensors,
gathered whole), plus the adapter / diff the case saves; ``--compare`` prints each case against DDP.
The module is a user's own LightningModule whose ``configure_model`` shards with ``shard_by_block``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import VOCAB, TokenDataset  # noqa: E402

from lightning_sft import (  # noqa: E402
    AttentionImplementation,
    ContextualSparsity,
    EfficiencyMonitor,
    GradientCheckpointing,
    LayerDropout,
    LoRA,
    SparseFineTuning,
    save_adapter,
    save_diff,
)
from lightning_sft.sharding import (  # noqa: E402
    fsdp1_full_parameters,
    full_tensor,
    has_sharded_parameters,
    rank_bytes,
    shard_by_block,
)

STEPS = 4
PER_RANK_BATCH = 4


def network(seed: int = 0) -> LlamaForCausalLM:
    """A tiny LLaMA whose widths are multiples of 64, so bitsandbytes' CPU 4-bit kernel decodes it."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).train()


class UserModule(pl.LightningModule):
    """A plain LightningModule: the network under ``self.net``, sharded by block in ``configure_model``."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = network()

    def configure_model(self) -> None:
        if self.device_mesh is not None and not has_sharded_parameters(self.net):
            shard_by_block(self.net, self.device_mesh["data_parallel"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels = batch.get("labels", batch["input_ids"])
        return self.net(input_ids=batch["input_ids"], labels=labels).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class StepLosses(Callback):
    """The training loss of every step, averaged over the processes."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


class Probe(Callback):
    """``read()`` at the end of training, before the callbacks' teardown."""

    def __init__(self, read: Callable[[], Any]) -> None:
        self.read, self.value = read, None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.value = self.read()


def context_labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[:, : ids.shape[1] // 2] = -100  # the first half is context: sparse under ContextualSparsity
    return labels


class LabelledDataset(TokenDataset):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        return {**item, "labels": context_labels(item["input_ids"][None])[0]}


def loader(samples: int = 2 * PER_RANK_BATCH * STEPS, batch_size: int = PER_RANK_BATCH) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(LabelledDataset(samples), batch_size=batch_size, shuffle=False)


def rank_batches(samples: int = 2 * PER_RANK_BATCH * STEPS, ranks: int = 2) -> torch.utils.data.DataLoader:
    """One process's loader whose every batch is the batches of ``ranks`` processes together, in the order
    Lightning's distributed sampler gives them (shuffled with seed 0, epoch 0)."""
    dataset = LabelledDataset(samples)
    orders = [list(torch.utils.data.DistributedSampler(dataset, ranks, rank, shuffle=True, seed=0)) for rank in range(ranks)]
    steps = len(orders[0]) // PER_RANK_BATCH
    batches = [[i for order in orders for i in order[s * PER_RANK_BATCH:(s + 1) * PER_RANK_BATCH]] for s in range(steps)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches)


def strategy(name: str) -> Any:
    """``fsdp`` is FSDP1 wrapping each decoder block; the other names are Lightning's (and ours: fsdp2)."""
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})
    return name


# Set from the command line; the launched processes parse the same one.
ACCELERATOR, DEVICES = "cpu", 2


def fit(name: str, callbacks: list[Callback], steps: int = STEPS, module: UserModule | None = None,
        **trainer_options: Any) -> tuple[pl.Trainer, UserModule, StepLosses]:
    module = module or UserModule()
    pl.seed_everything(0)  # after building: the processes re-seed as the fit starts, so the RNG is the same
    losses = StepLosses()
    options: dict[str, Any] = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                   enable_model_summary=False, num_sanity_val_steps=0)
    options.update(trainer_options)
    trainer = pl.Trainer(accelerator=ACCELERATOR, devices=DEVICES, strategy=strategy(name), max_steps=steps,
                         callbacks=[*callbacks, losses], **options)
    trainer.fit(module, loader())
    return trainer, module, losses


def trained_tensors(module: UserModule) -> dict[str, torch.Tensor]:
    """Every trainable tensor, gathered whole (a collective), by its name."""
    with fsdp1_full_parameters(module):
        return {name: full_tensor(p.detach()).cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def record(out: Path, key: str, trainer: pl.Trainer, module: UserModule, losses: StepLosses, **facts: Any) -> None:
    tensors = trained_tensors(module)
    if trainer.global_rank == 0:
        save_file(tensors, str(out / f"{key}.safetensors"))
        (out / f"{key}.json").write_text(json.dumps({"losses": losses.losses, **facts}))


def case_lora(out: Path, name: str) -> None:
    trainer, module, losses = fit(name, [LoRA(r=4)])
    save_adapter(module, out / f"lora-{name}-adapter")
    sharded = sum(type(p).__name__ == "DTensor" for p in module.parameters())
    bytes_ = rank_bytes(module, trainer.optimizers)
    record(out, f"lora-{name}", trainer, module, losses, sharded_parameters=sharded,
           parameters=sum(1 for _ in module.parameters()), rank_bytes=bytes_,
           optimizer_parameters=sum(len(g["params"]) for g in trainer.optimizers[0].param_groups),
           trainable_parameters=sum(1 for p in module.parameters() if p.requires_grad))


def case_qlora(out: Path, name: str) -> None:
    trainer, module, losses = fit(name, [LoRA(r=4, quantize="nf4")])
    record(out, f"qlora-{name}", trainer, module, losses)


def case_sparsity(out: Path, name: str) -> None:
    sparsity = ContextualSparsity(mlp_sparsity=0.5, attn_sparsity=0.25, dense_layers=(), dense_warmup=1,
                                  calibration_steps=1)
    blocks = Probe(lambda: len(sparsity.blocks))
    trainer, module, losses = fit(name, [LoRA(r=4), sparsity, blocks])
    record(out, f"sparsity-{name}", trainer, module, losses, blocks=blocks.value)


def case_layer_dropout(out: Path, name: str) -> None:
    dropout = LayerDropout(rate=0.5, protect_first=0, protect_last=0, seed=3)
    trainer, module, losses = fit(name, [LoRA(r=4), dropout])
    record(out, f"layer_dropout-{name}", trainer, module, losses, run_fractions=dropout.run_fractions)


def case_sft(out: Path, name: str) -> None:
    sft = SparseFineTuning(density=0.05, selection="random", reselect_every=2, score_batches=1, seed=5)
    trainer, module, losses = fit(name, [sft])
    save_diff(module, out / f"sft-{name}.diff.safetensors")
    indices = {n: b.clone() for n, b in module.named_buffers() if n.endswith("delta_indices")}
    if trainer.global_rank == 0:
        save_file(indices, str(out / f"sft-{name}-indices.safetensors"))
    record(out, f"sft-{name}", trainer, module, losses)


def case_fisher(out: Path, name: str) -> None:
    """Gradient-scored selection: scoring passes run on the sharded module before the fit."""
    trainer, module, losses = fit(name, [SparseFineTuning(density=0.05, selection="fisher", score_batches=2)])
    record(out, f"fisher-{name}", trainer, module, losses)


def case_checkpointing(out: Path, name: str) -> None:
    trainer, module, losses = fit(name, [LoRA(r=4), GradientCheckpointing()])
    record(out, f"checkpointing-{name}", trainer, module, losses)


def case_attention(out: Path, name: str) -> None:
    trainer, module, losses = fit(name, [LoRA(r=4), AttentionImplementation("eager")])
    record(out, f"attention-{name}", trainer, module, losses, implementation=module.net.config._attn_implementation)


def case_efficiency(out: Path, name: str) -> None:
    monitor = EfficiencyMonitor()
    trainer, module, losses = fit(name, [LoRA(r=4), monitor])
    logged = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("efficiency/")}
    record(out, f"efficiency-{name}", trainer, module, losses, logged=logged, totals=monitor.fit_totals)


def case_resume(out: Path, name: str) -> None:
    """Two epochs in one fit, and one epoch, a checkpoint, and the second epoch resumed from it."""
    data = lambda: loader(2 * PER_RANK_BATCH * 2)  # noqa: E731  (two steps per epoch)
    options: dict[str, Any] = dict(accelerator=ACCELERATOR, devices=DEVICES, strategy=strategy(name), logger=False,
                                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    whole, first, second = UserModule(), UserModule(), UserModule()
    pl.seed_everything(0)
    pl.Trainer(max_epochs=2, callbacks=[LoRA(r=4)], **options).fit(whole, data())
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=1, callbacks=[LoRA(r=4)], **options)
    trainer.fit(first, data())
    checkpoint = out / f"resume-{name}.ckpt"
    trainer.save_checkpoint(checkpoint)  # every rank: a sharded state is written by all of them
    pl.seed_everything(0)
    pl.Trainer(max_epochs=2, callbacks=[LoRA(r=4)], **options).fit(second, data(), ckpt_path=str(checkpoint))
    tensors = {f"whole/{k}": v for k, v in trained_tensors(whole).items()}
    tensors.update({f"resumed/{k}": v for k, v in trained_tensors(second).items()})
    if trainer.global_rank == 0:
        save_file(tensors, str(out / f"resume-{name}.safetensors"))
        (out / f"resume-{name}.json").write_text(json.dumps({"is_dir": checkpoint.is_dir()}))


def case_tensor_parallel(out: Path, name: str) -> None:
    """Lightning's default ModelParallelStrategy puts both processes in the tensor-parallel dimension."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = UserModule()
    before = sorted(module.state_dict())
    trainer = pl.Trainer(accelerator=ACCELERATOR, devices=DEVICES, strategy=ModelParallelStrategy(), max_steps=1, callbacks=[LoRA()],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(module, loader())
        error = None
    except RuntimeError as caught:
        error = str(caught)
    if trainer.global_rank == 0:
        unchanged = sorted(module.state_dict()) == before
        (out / "tensor_parallel-fsdp2.json").write_text(json.dumps({"error": error, "unchanged": unchanged}))


CASES: dict[str, Callable[[Path, str], None]] = {
    "lora": case_lora, "qlora": case_qlora, "sparsity": case_sparsity, "layer_dropout": case_layer_dropout,
    "sft": case_sft, "fisher": case_fisher, "checkpointing": case_checkpointing, "attention": case_attention,
    "efficiency": case_efficiency,
    "resume": case_resume, "tensor_parallel": case_tensor_parallel,
}
# The cases whose reference is the same run under DDP (lora and qlora are compared with one process, too).
DDP_REFERENCE = ("lora", "qlora", "sparsity", "layer_dropout", "sft", "fisher", "checkpointing", "attention", "resume")


def run_case(out: Path, case: str, name: str) -> None:
    """One case under one strategy; a refusal is a result (its message recorded), not a failure."""
    try:
        CASES[case](out, name)
    except RuntimeError as error:
        if "does not run under" not in str(error):
            raise
        if torch.distributed.get_rank() == 0:
            (out / f"{case}-{name}.json").write_text(json.dumps({"refused": str(error)}))


def compare(out: Path, cases: list[str], strategies: list[str]) -> str:
    """Each case under each strategy against DDP: the largest relative loss and tensor differences."""
    from safetensors.torch import load_file

    lines = ["| case | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
    for case in cases:
        cells = []
        for name in strategies:
            path, reference = out / f"{case}-{name}.json", out / f"{case}-ddp.json"
            facts = json.loads(path.read_text()) if path.exists() else {"refused": "not run"}
            if "refused" in facts:
                cells.append("refused: " + facts["refused"].split(":")[0])
            elif case not in DDP_REFERENCE or not reference.exists() or "losses" not in facts:
                cells.append("ran")
            else:
                ours, theirs = torch.tensor(facts["losses"]), torch.tensor(json.loads(reference.read_text())["losses"])
                loss = float(((ours - theirs).abs() / theirs.abs()).max())
                a, b = load_file(out / f"{case}-{name}.safetensors"), load_file(out / f"{case}-ddp.safetensors")
                tensor = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
                cells.append(f"loss {loss:.1e}, tensors {tensor:.1e}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--strategies", default="fsdp2", help="comma-separated; DDP references are added")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--compare", action="store_true", help="print each case against DDP at the end")
    args = parser.parse_args()
    ACCELERATOR, DEVICES = args.accelerator, args.devices
    chosen, strategies = args.cases.split(","), args.strategies.split(",")
    for case in chosen:
        if case == "tensor_parallel":
            if "fsdp2" in strategies:
                run_case(args.out, case, "fsdp2")
            continue
        for name in strategies + (["ddp"] if case in DDP_REFERENCE and "ddp" not in strategies else []):
            run_case(args.out, case, name)
    if args.compare and torch.distributed.get_rank() == 0:
        print(compare(args.out, [c for c in chosen if c != "tensor_parallel"], strategies))
    torch.distributed.destroy_process_group()  # stop gloo's threads before the interpreter exits
