"""``lightning-sft bench federated``: personal layers + per-client layer dropout against plain FedAvg.

Both federations run on the same non-IID split, from the same adapters, with the same local steps;
the baseline shares every adapter tensor and trains without layer dropout. Reported per setup:
the clients' mean personalised held-out accuracy (each on its own test split), training wall-clock
per round, and adapter bytes per round (down + up).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_sft.cli.federated import add_arguments as add_federation_arguments
from lightning_sft.federated.run import simulate, summary

NAME = "federated"
HELP = "Personalised federated LoRA (personal layers + per-client layer dropout) vs FedAvg of all adapters."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_federation_arguments(parser)
    parser.set_defaults(workdir="runs/bench-federated")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    setups = {
        "fedavg (all shared, no dropout)": ("none", None),
        f"ours (personal {args.personal}, dropout {args.layer_dropout})": (args.personal, args.layer_dropout),
    }
    figures = {}
    for label, (personal, dropout) in setups.items():
        result, _ = simulate(args, personal, dropout, save=False)
        figures[label] = summary(result)
        figures[label]["per_round_accuracy"] = [r.mean("test_acc") for r in result.rounds]
    if args.json:
        print(json.dumps(figures, indent=2, default=str))
        return 0
    print(
        f"{args.clients} clients, {args.rounds} rounds x {args.local_steps} local steps, Dirichlet alpha {args.alpha:g},"
        f" budgets {','.join(f'{b:g}' for b in args.budgets)}, weighting {args.weighting}"
    )
    print(f"{'setup':<48} {'accuracy':>8} {'train s/round':>13} {'MB/round':>8} {'personal':>8}  per-client accuracy")
    for label, f in figures.items():
        clients = " ".join(f"{100 * a:.1f}" for a in f["client_accuracy"].values())
        print(
            f"{label:<48} {100 * (f['accuracy'] or 0):>7.1f}% {f['train_seconds_per_round']:>13.1f}"
            f" {f['bytes_per_round'] / 1e6:>8.2f} {f['personal_tensors']:>8}  {clients}"
        )
    for label, f in figures.items():
        curve = " ".join("-" if a is None else f"{100 * a:.1f}" for a in f["per_round_accuracy"])
        print(f"accuracy by round, {label}: {curve}")
    base, ours = figures.values()
    print(
        f"ours vs fedavg: accuracy {100 * ((ours['accuracy'] or 0) - (base['accuracy'] or 0)):+.1f} points,"
        f" wall-clock/round x{ours['train_seconds_per_round'] / base['train_seconds_per_round']:.2f},"
        f" bytes/round x{ours['bytes_per_round'] / base['bytes_per_round']:.2f}"
    )
    print(f"(partitions in {Path(args.workdir)})")
    return 0
