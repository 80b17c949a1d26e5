"""``lightning-sft federated``: simulate federated LoRA fine-tuning of the embedded task on one machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lightning_sft.atomic_io import atomic_path
from lightning_sft.usage import UsageParser
from lightning_sft.validation import int_at_least
from lightning_sft.federated.aggregation import WEIGHTINGS
from lightning_sft.federated.run import report_json, simulate, summary
from lightning_sft.federated.simulation import FederatedResult


def _budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"use comma-separated numbers in (0, 1], e.g. 1,0.9,0.8,0.7; got {text!r}")
    return values


def _dropout(text: str) -> float | str | None:
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate < 1.0:
        raise argparse.ArgumentTypeError(f"use 'auto', 'off' or a rate in [0, 1); got {text!r}")
    return rate


def _personal(text: str) -> str | list[str]:
    if text in ("auto", "none") or text.startswith(("last:", "first:")):
        return text
    return [part for part in text.split(",") if part]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int_at_least(1), default=4, help="simulated clients (default 4)")
    parser.add_argument("--rounds", type=int_at_least(1), default=5, help="federated rounds (default 5)")
    parser.add_argument("--local-steps", type=int_at_least(1), default=40, help="optimizer steps per client per round (default 40)")
    parser.add_argument(
        "--personal", type=_personal, default="auto",
        help="personal layers: auto (chosen after round 1 by update agreement), none (FedAvg of all), last:K, first:K,"
        " or comma-separated regexes over adapter names (e.g. lora_B); default auto",
    )
    parser.add_argument("--agreement", type=float, default=0.5, help="under --personal auto: blocks whose update agreement is below this go personal (default 0.5)")
    parser.add_argument("--layer-dropout", type=_dropout, default="auto", help="auto (a bandit per client), off, or a fixed rate (default auto)")
    parser.add_argument("--budgets", type=_budgets, default=(1.0, 0.9, 0.8, 0.7), help="per-client compute budgets, cycled (default 1,0.9,0.8,0.7)")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="layer", help="aggregation weights (default layer)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet skew of the skills over clients (default 0.5; small = more non-IID)")
    parser.add_argument("--model", default="sft-llama-5m", help="base model (default: the shipped sft-llama-5m)")
    parser.add_argument("--lora-r", "--lora.r", type=int_at_least(1), default=16, help="LoRA rank (default 16; --lora.r as in fit)")
    parser.add_argument("--lr", type=float, default=3e-3, help="client learning rate (default 3e-3)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32, help="client batch size (default 32)")
    parser.add_argument("--num-train", type=int_at_least(1), default=8000, help="training examples over all clients (default 8000)")
    parser.add_argument("--num-val", type=int_at_least(1), default=512, help="validation examples over all clients (default 512)")
    parser.add_argument("--num-test", type=int_at_least(1), default=1000, help="held-out test examples over all clients (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the partition and the adapters (default 0)")
    parser.add_argument("--cpus-per-client", type=int_at_least(1), default=1, help="cores per simulated client (default 1)")
    parser.add_argument("--workdir", default="runs/federated", help="where the client partitions, adapters and report go")


def format_report(result: FederatedResult, counts: list[dict[str, int]]) -> str:
    lines = ["client  train examples by skill"]
    lines += [f"{i:>6}  {sum(c.values()):>5}  " + " ".join(f"{k} {v}" for k, v in c.items()) for i, c in enumerate(counts)]
    lines += ["", "round  train s  MB down  MB up  MB eval  train loss  personalised acc  failures"]
    for r in result.rounds:
        mean_loss, mean_acc = r.mean("train-loss", "train"), r.mean("test_acc")
        loss = "-" if mean_loss is None else f"{mean_loss:.4f}"
        acc = "-" if mean_acc is None else f"{100 * mean_acc:.1f}%"
        lines.append(
            f"{r.round:>5}  {r.train_seconds:>7.1f}  {r.bytes_down / 1e6:>7.2f}  {r.bytes_up / 1e6:>5.2f}  {r.eval_bytes_down / 1e6:>7.2f}"
            f"  {loss:>10}  {acc:>16}  {len(r.failures):>8}"
        )
    figures = summary(result)
    lines.append("")
    lines.append(
        f"personal tensors: {figures['personal_tensors']} of {result.total_tensors}"
        + (f" ({', '.join(sorted({n.rsplit('.', 2)[0] for n in result.personal}))})" if result.personal else "")
    )
    probe = next((r for r in result.rounds if r.agreement), None)
    if probe is not None:
        lines.append("update agreement after round 1: " + ", ".join(f"{g.rsplit('.', 1)[-1] if g[-1].isdigit() else g} {a:.2f}" for g, a in probe.agreement.items()))
    if figures["client_accuracy"]:
        lines.append("final personalised accuracy per client: " + ", ".join(f"{c}: {100 * a:.1f}%" for c, a in figures["client_accuracy"].items()))
    if any(v is not None for v in figures["drop_rates"].values()):
        lines.append("last drop rate per client: " + ", ".join(f"{c}: {v:g}" for c, v in figures["drop_rates"].items() if v is not None))
    lines.append(
        f"mean: accuracy {100 * (figures['accuracy'] or 0):.1f}%, {figures['train_seconds_per_round']:.1f} s and"
        f" {figures['bytes_per_round'] / 1e6:.2f} MB (train down + up) per round"
    )
    for r in result.rounds:
        for failure in r.failures:
            lines.append(f"round {r.round}: {failure.splitlines()[0][:200]}")
    return "\n".join(lines)


def build_parser() -> UsageParser:
    parser = UsageParser(
        prog="lightning-sft federated",
        description="Simulate federated LoRA fine-tuning of the embedded arithmetic task with Flower: clients on a"
        " non-IID split, per-client layer dropout, personal layers. See docs/federated.md.",
    )
    add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--tolerate-failures", action="store_true",
                        help="exit 0 even when a client failed in the last round (default: exit 1)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        result, counts = simulate(args, args.personal, args.layer_dropout)
    except ValueError as error:
        print(f"lightning-sft federated: error: {error}", file=sys.stderr)
        return 2
    report = report_json(result, counts)
    with atomic_path(Path(args.workdir) / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(result, counts))
    print(f"report: {Path(args.workdir) / 'report.json'}; adapters: {Path(args.workdir) / 'adapters'}", file=sys.stderr)
    failed = result.rounds[-1].failures if result.rounds else []
    if failed and not args.tolerate_failures:
        print(f"lightning-sft federated: error: {len(failed)} client(s) failed in the last round: "
              f"{failed[0].splitlines()[0][:200]} (--tolerate-failures exits 0 anyway)", file=sys.stderr)
        return 1
    return 0
