"""``lightning-sft bench``: micro-benchmarks, one subcommand per module of :mod:`lightning_sft.bench`.

A benchmark module provides ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
adding one is a single entry in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
from types import ModuleType

from lightning_sft.bench import (
    demo,
    distributed,
    federated,
    fused_ce,
    kernels,
    layer_dropout,
    lora,
    memory,
    offload,
    quality,
    rank,
    recall,
    sparse_ft,
    sparsity,
)
from lightning_sft.usage import UsageParser

BENCHMARKS: tuple[ModuleType, ...] = (
    lora, sparsity, recall, quality, rank, layer_dropout, sparse_ft, memory, distributed, federated, kernels, demo, fused_ce,
    offload,
)


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="lightning-sft bench", description="Run a lightning-sft benchmark.")
    subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for module in BENCHMARKS:
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str]) -> int:
    """Parse ``argv`` (the words after ``bench``) and run the chosen benchmark; returns its exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)
