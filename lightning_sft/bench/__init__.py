"""Micro-benchmarks, one module per benchmark; ``lightning-sft bench`` (:mod:`lightning_sft.cli.bench`) runs them.

A benchmark module provides ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
adding one is a single entry in :data:`lightning_sft.cli.bench.BENCHMARKS`.
"""
