"""Adaptive LoRA rank search against a full sweep of the candidate ranks, on the main job.

Every run is the README's main job, ``lightning-sft fit`` on the shipped ``sft-llama-5m`` base and
the embedded arithmetic task, in its own process. The sweep trains each candidate rank for the
whole budget (alpha = 2r, the main job's alpha/r); the search runs are the main job with
``AdaptiveRankSearch`` (uniform, then ``per_module``), which picks a rank from short trials and then
trains it for the whole budget. A run's objective is the rank search's own rule applied after full
training, on held-out data the search never sees:

    objective = test loss after training + penalty * adapter parameters / those of the largest candidate.

Compute is counted in forward-pass equivalents, a training step as 3 (forward and a backward of
twice its cost), an evaluated batch as 1: the search's trial steps and validation batches against
the sweep's training steps plus one evaluation of the same validation batches per rank. That count
does not depend on what else runs on the machine; the seconds are reported next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightning_sft.bench.common import main_job_summary, run_and_report
from lightning_sft.validation import int_at_least
from lightning_sft.rank_search import DEFAULT_CANDIDATES, validate_candidates

NAME = "rank"
HELP = "adaptive LoRA rank search against a full sweep of the candidate ranks on the main job"
OBJECTIVE_MARGIN, COMPUTE_TARGET = 0.02, 0.25
STEP_COST = 3  # a training step in forward-pass equivalents


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers; got {text!r}") from error


def _candidates(text: str) -> list[int]:
    try:
        return list(validate_candidates(_ints(text)))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _seeds(text: str) -> list[int]:
    seeds = _ints(text)
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 0; got {text!r}")
    return seeds


def _penalty(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0; got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = ",".join(map(str, DEFAULT_CANDIDATES))
    parser.add_argument("--candidates", type=_candidates, default=list(DEFAULT_CANDIDATES),
                        help=f"comma-separated ranks (default {default})")
    parser.add_argument("--steps", type=int_at_least(40), default=600, help="optimizer steps per fit (default 600)")
    parser.add_argument("--trial-steps", type=int_at_least(1), default=50, help="search: steps per trial (default 50)")
    parser.add_argument("--val-batches", type=int_at_least(1), default=8,
                        help="search: validation batches per trial (default 8, the whole validation split)")
    parser.add_argument("--penalty", type=_penalty, default=0.1,
                        help="weight of the relative parameter count (default 0.1)")
    parser.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds (default 0)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lightning-sft bench rank``."""
    return run_and_report(
        args.threads, args.json,
        lambda: benchmark(args.candidates, args.seeds, args.steps, args.trial_steps, args.val_batches, args.penalty,
                          args.threads),
        format_report,
    )


def search_flags(candidates: list[int], trial_steps: int, val_batches: int, penalty: float, per_module: bool) -> list[str]:
    """``lightning-sft fit`` flags adding the search (the main job's LoRA settings stay)."""
    return [
        "--trainer.callbacks+=AdaptiveRankSearch",
        "--trainer.callbacks.candidates", json.dumps(candidates),
        "--trainer.callbacks.trial_steps", str(trial_steps),
        "--trainer.callbacks.val_batches", str(val_batches),
        "--trainer.callbacks.penalty", str(penalty),
        "--trainer.callbacks.per_module", str(per_module).lower(),
    ]


def _fit(flags: list[str], seed: int, steps: int, root: Path, threads: int | None) -> dict[str, Any]:
    """One main-job run in a fresh process; its summary.json (a seam the tests replace)."""
    return main_job_summary(flags, seed, steps, root, threads)


def _train_seconds(summary: dict[str, Any]) -> float:
    """Time in training steps (EfficiencyMonitor's), without validation or the before/after test passes."""
    return summary["mean_step_time_s"] * summary["steps"]


def benchmark(
    candidates: list[int], seeds: list[int], steps: int, trial_steps: int, val_batches: int, penalty: float,
    threads: int | None = None,
) -> dict[str, Any]:
    start = time.perf_counter()
    per_seed = []
    with tempfile.TemporaryDirectory(prefix="lsft-rank-") as tmp:
        for seed in seeds:
            sweep = {
                rank: _fit(["--lora.r", str(rank), "--lora.alpha", str(2 * rank)], seed, steps,
                           Path(tmp) / f"sweep-{rank}-{seed}", threads)
                for rank in candidates
            }
            searches = {
                mode: _fit(search_flags(candidates, trial_steps, val_batches, penalty, mode == "per-module"), seed, steps,
                           Path(tmp) / f"{mode}-{seed}", threads)
                for mode in ("uniform", "per-module")
            }
            per_seed.append(_evaluate(seed, sweep, searches, candidates, penalty))
    return {
        "candidates": candidates,
        "steps": steps,
        "trial_steps": trial_steps,
        "val_batches": val_batches,
        "penalty": penalty,
        "seeds": per_seed,
        "mean_gap": statistics.fmean(s["gap"] for s in per_seed),
        "mean_compute_fraction": statistics.fmean(s["compute_fraction"] for s in per_seed),
        "meets_targets": all(s["meets_targets"] for s in per_seed),
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
    }


def _evaluate(
    seed: int, sweep: dict[int, dict[str, Any]], searches: dict[str, dict[str, Any]], candidates: list[int],
    penalty: float,
) -> dict[str, Any]:
    """One seed's tables, the pick against the sweep's best, and the search's cost against the sweep's."""
    largest = sweep[candidates[-1]]["trainable_params"]

    def row(summary: dict[str, Any]) -> dict[str, Any]:
        params = summary["trainable_params"]
        test_loss = summary["test_loss_after"]
        return {"params": params, "test_loss": test_loss, "test_acc": summary["test_acc_after"],
                "objective": test_loss + penalty * params / largest, "train_seconds": _train_seconds(summary)}

    sweep_rows = {rank: row(summary) for rank, summary in sweep.items()}
    best = min(sweep_rows, key=lambda rank: (sweep_rows[rank]["objective"], rank))
    uniform, per_module = searches["uniform"], searches["per-module"]
    record = uniform["rank_search"]
    pick = record["rank"]
    gap = sweep_rows[pick]["objective"] / sweep_rows[best]["objective"] - 1
    sweep_steps = len(candidates) * sweep[candidates[0]]["steps"]
    sweep_seconds = sum(r["train_seconds"] for r in sweep_rows.values())
    search_compute = STEP_COST * record["trial_steps"] + record["val_batches"]
    sweep_compute = STEP_COST * sweep_steps + len(candidates) * record["val_batches_per_trial"]
    compute_fraction = search_compute / sweep_compute
    return {
        "seed": seed,
        "sweep": sweep_rows,
        "best": best,
        "trials": record["trials"],
        "pick": pick,
        "gap": gap,
        "search_run": row(uniform),
        "search_trial_steps": record["trial_steps"],
        "search_val_batches": record["val_batches"],
        "search_seconds": record["trial_seconds"],
        "sweep_steps": sweep_steps,
        "sweep_seconds": sweep_seconds,
        "compute_fraction": compute_fraction,
        "seconds_fraction": record["trial_seconds"] / sweep_seconds,
        "per_module": {**row(per_module), "rank": per_module["rank_search"]["rank"],
                       "ranks": per_module["rank_search"]["ranks"]},
        "meets_targets": gap <= OBJECTIVE_MARGIN and compute_fraction <= COMPUTE_TARGET,
    }


def format_report(result: dict[str, Any]) -> str:
    ranks = ",".join(map(str, result["candidates"]))
    lines = [
        f"Main job (lightning-sft fit: sft-llama-5m, embedded arithmetic task) for {result['steps']} steps per fit;"
        f" candidates {ranks}, alpha = 2r; search: {result['trial_steps']} steps per trial, {result['val_batches']}"
        f" validation batches; penalty {result['penalty']:g}; torch {result['torch']}, {result['threads']} threads,"
        f" {result['seconds'] / 60:.1f} min",
        "objective = test loss after training (500 held-out questions) + penalty x params / params of the largest rank",
    ]
    for seed in result["seeds"]:
        lines += ["", f"seed {seed['seed']}: (a) full sweep, every rank trained for the whole budget",
                  f"{'rank':>6} {'params':>10} {'test loss':>10} {'exact match':>12} {'objective':>10} {'train s':>8}"]
        for rank, row in seed["sweep"].items():
            mark = "  best" if rank == seed["best"] else ("  picked" if rank == seed["pick"] else "")
            mark = "  best, picked" if rank == seed["best"] == seed["pick"] else mark
            lines.append(f"{rank:>6} {row['params']:>10,} {row['test_loss']:>10.4f} {row['test_acc'] * 100:>11.1f}%"
                         f" {row['objective']:>10.4f} {row['train_seconds']:>8.1f}{mark}")
        lines += [f"(b) search: {len(seed['trials'])} trials (val loss after the trial, score = val loss + penalty x p(r))",
                  f"{'round':>5} {'rank':>6} {'steps':>6} {'val loss':>10} {'score':>10} {'seconds':>8}"]
        last = max(trial["round"] for trial in seed["trials"])
        for trial in seed["trials"]:
            mark = "  <- pick" if trial["round"] == last and trial["rank"] == seed["pick"] else ""
            lines.append(f"{trial['round'] + 1:>5} {trial['rank']:>6} {trial['steps']:>6} {trial['val_loss']:>10.4f}"
                         f" {trial['score']:>10.4f} {trial['seconds']:>8.1f}{mark}")
        run = seed["search_run"]
        same = run["test_loss"] == seed["sweep"][seed["pick"]]["test_loss"]
        lines += [
            f"pick r={seed['pick']}: full-training objective {seed['sweep'][seed['pick']]['objective']:.4f} vs the sweep's"
            f" best {seed['sweep'][seed['best']]['objective']:.4f} (r={seed['best']}): {seed['gap'] * 100:+.2f}%"
            f" (target <= +{OBJECTIVE_MARGIN * 100:.0f}%)",
            f"the search run then trained r={seed['pick']}: test loss {run['test_loss']:.4f}"
            f" ({'identical to' if same else 'differs from'} the sweep's r={seed['pick']} run)",
            f"search cost: {seed['search_trial_steps']} trial steps + {seed['search_val_batches']} validation batches,"
            f" {seed['search_seconds']:.1f} s; sweep: {seed['sweep_steps']} steps, {seed['sweep_seconds']:.1f} s"
            f" -> {seed['compute_fraction'] * 100:.1f}% of the sweep's compute (target <= {COMPUTE_TARGET * 100:.0f}%),"
            f" {seed['seconds_fraction'] * 100:.1f}% of its seconds",
        ]
        pm = seed["per_module"]
        uniform = seed["sweep"][pm["rank"]]
        spread = sorted(pm["ranks"].values())
        lines += [
            f"(c) per-module ranks within the budget of r={pm['rank']}: {pm['params']:,} params (uniform"
            f" {uniform['params']:,}), ranks {spread[0]}-{spread[-1]} (median {statistics.median(spread):g});"
            f" test loss {pm['test_loss']:.4f} vs uniform {uniform['test_loss']:.4f}, objective {pm['objective']:.4f} vs"
            f" {uniform['objective']:.4f}",
        ]
    lines += ["", f"pick within {OBJECTIVE_MARGIN * 100:.0f}% of the sweep's best and search <="
                  f" {COMPUTE_TARGET * 100:.0f}% of its compute on every seed: {'yes' if result['meets_targets'] else 'no'}"
                  f" (mean gap {result['mean_gap'] * 100:+.2f}%, mean compute {result['mean_compute_fraction'] * 100:.1f}%)"]
    return "\n".join(lines)
