"""One federated run of the embedded task from command-line settings, and the figures its report quotes.

``lightning-sft federated`` (:mod:`lightning_sft.cli.federated`) and ``bench federated`` both run it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lightning_sft.federated.arithmetic import arithmetic_task, write_partitions
from lightning_sft.federated.simulation import FederatedResult, run_federated


def simulate(args: argparse.Namespace, personal: Any, layer_dropout: Any, save: bool = True) -> tuple[FederatedResult, list[dict[str, int]]]:
    """Partition the task into ``args.workdir`` and run the federation with this sharing and dropout."""
    counts = write_partitions(args.workdir, args.clients, args.alpha, args.num_train, args.num_val, args.num_test, args.seed)
    task = arithmetic_task(args.workdir, args.model, args.lr, args.batch_size, args.lora_r, 2.0 * args.lora_r, args.seed)
    result = run_federated(
        task, args.clients, args.rounds, args.local_steps, personal=personal, layer_dropout=layer_dropout,
        budgets=args.budgets, weighting=args.weighting, agreement_threshold=args.agreement,
        cpus_per_client=args.cpus_per_client, seed=args.seed,
        save_dir=str(Path(args.workdir) / "adapters") if save else None,
    )
    return result, counts


def summary(result: FederatedResult) -> dict[str, Any]:
    """The figures a report quotes: final personalised accuracy, per-round cost, who dropped what."""
    rounds = result.rounds
    accuracy = result.final_accuracy()
    last = rounds[-1] if rounds else None
    return {
        "accuracy": sum(accuracy.values()) / len(accuracy) if accuracy else None,
        "client_accuracy": accuracy,
        "train_seconds_per_round": sum(r.train_seconds for r in rounds) / len(rounds),
        "bytes_per_round": sum(r.bytes_down + r.bytes_up for r in rounds) / len(rounds),
        "bytes_up_per_round": sum(r.bytes_up for r in rounds) / len(rounds),
        "failures": sum(len(r.failures) for r in rounds),
        "personal_tensors": len(result.personal),
        "shared_tensors": result.total_tensors - len(result.personal),
        "drop_rates": {c: v.get("drop-rate") for c, v in sorted(last.train.items())} if last else {},
    }


def report_json(result: FederatedResult, counts: list[dict[str, int]]) -> dict[str, Any]:
    return {
        "settings": result.settings,
        "partition": counts,
        "summary": summary(result),
        "personal": result.personal,
        "rounds": [vars(r) for r in result.rounds],
    }
