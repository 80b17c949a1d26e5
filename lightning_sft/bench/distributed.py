"""``lightning-sft bench distributed``: FSDP2 on 2 CPU processes against 1 process, on the shipped base.

LoRA fine-tunes ``sft-llama-5m`` on the embedded task twice: under ``strategy="fsdp2"`` with 2 gloo
processes (``--batch`` sequences each), and on 1 process that accumulates the same two micro-batches
per step (the batches Lightning's distributed sampler hands each rank, padded as there), which is the
same gradient. Reported: both loss curves and their largest difference, and each rank's parameter and
optimizer-state bytes against the memory model's ZeRO-3 estimate (target within 5%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lightning_sft.bench.common import run_and_report
from lightning_sft.validation import int_at_least

NAME = "distributed"
HELP = "FSDP2 (2 CPU processes) vs 1 process on the shipped base: loss curves and per-rank bytes vs the memory model."
PROCESSES = 2
LORA_R = 16
TARGET = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int_at_least(1), default=30, help="optimizer steps (default 30)")
    parser.add_argument("--batch", type=int_at_least(1), default=8, help="sequences per process and step (default 8)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def _parts(steps: int, batch: int) -> tuple[Any, Any]:
    """The module (recording each training loss) and the embedded task's training examples and collate."""
    import functools

    from lightning_sft.data.prompt_response import PromptResponseData, collate
    from lightning_sft.modules import CausalLM

    class Recorded(CausalLM):
        def __init__(self) -> None:
            super().__init__(model="sft-llama-5m", lr=3e-3, warmup_steps=min(5, steps - 1) if steps > 1 else 0)
            self.losses: list[Any] = []

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            self.losses.append(loss.detach())
            return loss

    data = PromptResponseData(tokenizer="sft-llama-5m", num_train=steps * batch * PROCESSES, num_val=1, num_test=1,
                              batch_size=batch)
    data.setup("fit")
    examples = data._encoded["train"]
    return Recorded(), (examples, functools.partial(collate, pad_id=data.tokenizer.pad_token_id))


def _trainer(**options: Any) -> Any:
    import lightning.pytorch as pl

    from lightning_sft import LoRA

    return pl.Trainer(accelerator="cpu", callbacks=[LoRA(r=LORA_R, alpha=2 * LORA_R)], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, **options)


def worker(out: Path, steps: int, batch: int) -> None:
    """The FSDP2 run (Lightning starts the second process by running this module again)."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from lightning_sft.sharding import rank_bytes

    module, (examples, collate) = _parts(steps, batch)
    pl.seed_everything(0)
    trainer = _trainer(devices=PROCESSES, strategy="fsdp2", max_steps=steps)
    trainer.fit(module, DataLoader(examples, batch_size=batch, shuffle=False, collate_fn=collate))
    losses = [float(trainer.strategy.reduce(loss, reduce_op="mean")) for loss in module.losses]
    per_rank = [None] * trainer.world_size
    torch.distributed.all_gather_object(per_rank, rank_bytes(module, trainer.optimizers))
    if trainer.global_rank == 0:
        (out / "fsdp2.json").write_text(json.dumps({"losses": losses, "rank_bytes": per_rank}))
    # Gloo's threads must stop before the interpreter does, or its exit can abort ("terminate called"); even
    # after destroy_process_group one in three exits still did here, so with the results written the process
    # ends without the interpreter's teardown.
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def one_process(steps: int, batch: int) -> list[float]:
    """The same steps on one process: each step accumulates the two ranks' micro-batches."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    module, (examples, collate) = _parts(steps, batch)
    orders = [list(DistributedSampler(examples, PROCESSES, rank, shuffle=True, seed=0)) for rank in range(PROCESSES)]
    micro = [order[s * batch:(s + 1) * batch] for s in range(steps) for order in orders]
    pl.seed_everything(0)
    trainer = _trainer(devices=1, max_steps=steps, accumulate_grad_batches=PROCESSES)
    trainer.fit(module, DataLoader(examples, batch_sampler=micro, collate_fn=collate))
    losses = torch.stack(module.losses).view(steps, PROCESSES).mean(1)
    return [float(value) for value in losses]


def measure(steps: int, batch: int) -> dict[str, Any]:
    from lightning_sft.memory.estimate import estimate
    from lightning_sft.memory.setup import TrainingSetup

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        command = [sys.executable, "-m", "lightning_sft.bench.distributed", "--worker", tmp, str(steps), str(batch)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"The FSDP2 run failed:\n{result.stderr[-4000:]}")
        sharded = json.loads((Path(tmp) / "fsdp2.json").read_text())
    reference = one_process(steps, batch)
    differences = [abs(a - b) / abs(b) for a, b in zip(sharded["losses"], reference)]
    setup = TrainingSetup(method="lora", precision="32-true", lora_r=LORA_R, zero_stage=3, gpus=PROCESSES, batch=batch)
    model = estimate("sft-llama-5m", setup)
    ranks = []
    for rank, measured in enumerate(sharded["rank_bytes"]):
        parameters = measured["trainable"] + measured["frozen"]
        ranks.append({
            "rank": rank, "parameters": parameters, "optimizer": measured["optimizer"],
            "model_parameters": model.sizes["weights"], "model_optimizer": model.sizes["optimizer"],
            "parameters_error": parameters / model.sizes["weights"] - 1,
            "optimizer_error": measured["optimizer"] / model.sizes["optimizer"] - 1,
        })
    return {
        "steps": steps, "batch_per_process": batch, "processes": PROCESSES, "lora_r": LORA_R,
        "fsdp2_losses": sharded["losses"], "one_process_losses": reference,
        "max_relative_loss_difference": max(differences), "ranks": ranks, "target": TARGET,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"LoRA r={result['lora_r']} on sft-llama-5m, {result['steps']} steps, {result['batch_per_process']} sequences"
        f" per process: FSDP2 x{result['processes']} (gloo, CPU) vs 1 process accumulating the same micro-batches.",
        "",
        "| step | FSDP2 loss | 1-process loss |",
        "|---|---|---|",
    ]
    steps = len(result["fsdp2_losses"])
    shown = sorted({0, 1, steps // 4, steps // 2, 3 * steps // 4, steps - 1} & set(range(steps)))
    for step in shown:
        lines.append(f"| {step + 1} | {result['fsdp2_losses'][step]:.6f} | {result['one_process_losses'][step]:.6f} |")
    lines += [
        "",
        f"largest relative loss difference over {steps} steps: {result['max_relative_loss_difference']:.2e}",
        "",
        "| rank | parameter bytes | model (ZeRO-3) | error | optimizer bytes | model (ZeRO-3) | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["ranks"]:
        lines.append(
            f"| {r['rank']} | {r['parameters']:,} | {r['model_parameters']:,} | {r['parameters_error']:+.2%} |"
            f" {r['optimizer']:,} | {r['model_optimizer']:,} | {r['optimizer_error']:+.2%} |"
        )
    worst = max(max(abs(r["parameters_error"]), abs(r["optimizer_error"])) for r in result["ranks"])
    lines += ["", f"worst per-rank error {worst:.2%} (target <= {result['target']:.0%}): {'met' if worst <= result['target'] else 'NOT met'}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    return run_and_report(args.threads, args.json, lambda: measure(args.steps, args.batch), report)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
