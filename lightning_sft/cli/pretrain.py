"""``lightning-sft pretrain``: reproduce the shipped base model with our own Lightning stack."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_sft.pretraining.run import pretrain
from lightning_sft.usage import UsageParser


def build_parser() -> UsageParser:
    parser = UsageParser(prog="lightning-sft pretrain", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory for the model, tokenizer and record")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--number-lines", type=int, default=100_000)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--val-interval", type=int, default=250, help="validate every N steps")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.val_interval) <= 0 or args.seq_len <= 1:
        parser.error("--steps, --batch-size and --val-interval must be positive and --seq-len at least 2")
    record = pretrain(args.out, args.steps, args.batch_size, args.seq_len, args.lr, args.seed, args.number_lines,
                      args.vocab_size, args.val_interval)
    print(json.dumps(record, indent=2))
    return 0
