"""The embedded arithmetic task split across clients: the federation behind ``lightning-sft federated``.

Each client gets a Dirichlet(alpha) label-skewed share of the four skills (add, sub, max, next) for
its train, validation and test splits, written as JSONL under ``workdir/client-<i>/`` so that each
client's data is plain files, as it would be on a device.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl

from lightning_sft.callbacks.lora import LoRA
from lightning_sft.data import PromptResponseData
from lightning_sft.federated.client import FederatedTask
from lightning_sft.federated.partition import dirichlet_shares, split_by_shares
from lightning_sft.modules import CausalLM
from lightning_sft.tasks.arithmetic import SKILLS, generate_splits, write_jsonl


def write_partitions(
    workdir: str | Path, num_clients: int, alpha: float, num_train: int, num_val: int, num_test: int, seed: int
) -> list[dict[str, int]]:
    """Write each client's splits; returns each client's example count per skill (train split)."""
    splits = generate_splits(num_train, num_val, num_test, seed)
    shares = dirichlet_shares(list(SKILLS), num_clients, alpha, seed)
    counts: list[dict[str, int]] = [{} for _ in range(num_clients)]
    parts = {name: split_by_shares(examples, [e.skill for e in examples], shares) for name, examples in splits.items()}
    for client in range(num_clients):
        for name in splits:
            if not parts[name][client]:
                raise ValueError(
                    f"Client {client} got no {name} examples with alpha={alpha:g}: raise alpha (less skew) or the"
                    " number of examples."
                )
            write_jsonl(parts[name][client], Path(workdir) / f"client-{client}" / f"{name}.jsonl")
        counts[client] = {skill: sum(e.skill == skill for e in parts["train"][client]) for skill in sorted(SKILLS)}
    return counts


def _module(model: str, lr: float) -> pl.LightningModule:
    return CausalLM(model=model, lr=lr)


def _data(workdir: str, model: str, batch_size: int, client: int, num_clients: int) -> pl.LightningDataModule:
    folder = Path(workdir) / f"client-{client}"
    return PromptResponseData(
        tokenizer=model, train_file=str(folder / "train.jsonl"), val_file=str(folder / "val.jsonl"),
        test_file=str(folder / "test.jsonl"), batch_size=batch_size,
    )


def _callbacks(r: int, alpha: float, client: int) -> list[LoRA]:
    return [LoRA(r=r, alpha=alpha)]


def arithmetic_task(
    workdir: str | Path, model: str = "sft-llama-5m", lr: float = 3e-3, batch_size: int = 32, lora_r: int = 16,
    lora_alpha: float = 32.0, adapter_seed: int = 0,
) -> FederatedTask:
    """A ``FederatedTask`` over the partitions ``write_partitions`` wrote to ``workdir`` (picklable, for Ray)."""
    return FederatedTask(
        module=functools.partial(_module, model, lr),
        data=functools.partial(_data, str(workdir), model, batch_size),
        callbacks=functools.partial(_callbacks, lora_r, lora_alpha),
        adapter_seed=adapter_seed,
    )
