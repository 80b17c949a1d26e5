"""Quality and speed of contextual-sparsity settings on the main job (the embedded task).

Every variant is the README's main job, ``lightning-sft fit`` on the shipped ``sft-llama-5m`` base
and the embedded arithmetic task, run in its own process with one extra flag set, for each seed.
Variants of one seed run back to back (dense first), so the step-time ratios compare runs taken
minutes apart on the same machine. The summary each run writes (``summary.json``) gives the
held-out exact match, the test loss, the mean step time of the whole fit (dense warm-up and
calibration included) and the effective vs dense FLOPs from ``EfficiencyMonitor``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightning_sft.bench.common import main_job_summary, run_and_report
from lightning_sft.validation import int_at_least

NAME = "quality"
HELP = "held-out accuracy and step time of contextual-sparsity settings on the main job, against dense LoRA"
_SPARSITY = ["--trainer.callbacks+=ContextualSparsity"]
# name -> (description, extra flags for `lightning-sft fit`)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense LoRA (the main job as shipped)", []),
    "uniform-0.5": ("--sparsity svd: MLP 0.5 on layers 1-4, first and last dense", ["--sparsity", "svd"]),
    "auto-0.5": ("mlp_sparsity=auto, flops_budget 0.5 (the FLOPs of uniform-0.5)",
                 [*_SPARSITY, "--trainer.callbacks.mlp_sparsity", "auto", "--trainer.callbacks.flops_budget", "0.5"]),
    "uniform-0.9": ("MLP 0.9 on layers 1-4", [*_SPARSITY, "--trainer.callbacks.mlp_sparsity", "0.9"]),
    "auto-0.1": ("mlp_sparsity=auto, flops_budget 0.1 (the FLOPs of uniform-0.9)",
                 [*_SPARSITY, "--trainer.callbacks.mlp_sparsity", "auto", "--trainer.callbacks.flops_budget", "0.1"]),
    "preset": ("preset llama3-8b-math10k rescaled to 6 layers (MLP 0.99 on layers 1-4)",
               [*_SPARSITY, "--trainer.callbacks.mlp_sparsity", "llama3-8b-math10k"]),
}
ACCURACY_MARGIN, SPEEDUP_TARGET = 0.01, 1.3


def _names(text: str, known: dict[str, Any], what: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}; choose from {', '.join(known)}")
    return names


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers; got {text!r}") from error
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 0; got {text!r}")
    return seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", type=lambda t: _names(t, VARIANTS, "variant"), default=list(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default all; dense always runs)")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1], help="comma-separated seeds (default 0,1)")
    parser.add_argument("--steps", type=int_at_least(40), default=600, help="optimizer steps per run (default 600)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lightning-sft bench quality``."""
    return run_and_report(
        args.threads, args.json, lambda: benchmark(args.variants, args.seeds, args.steps, args.threads), format_report
    )


def _fit(flags: list[str], seed: int, steps: int, root: Path, threads: int | None) -> dict[str, Any]:
    """One main-job run in a fresh process; its summary.json (a seam the tests replace)."""
    return main_job_summary(flags, seed, steps, root, threads)


def benchmark(variants: list[str], seeds: list[int], steps: int, threads: int | None = None) -> dict[str, Any]:
    names = ["dense", *[name for name in variants if name != "dense"]]
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="lsft-quality-") as tmp:
        for seed in seeds:
            for name in names:
                summary = _fit(VARIANTS[name][1], seed, steps, Path(tmp) / f"{name}-{seed}", threads)
                runs[name].append({
                    "seed": seed,
                    "accuracy": summary["test_acc_after"],
                    "test_loss": summary["test_loss_after"],
                    "step_time_s": summary["mean_step_time_s"],
                    "flops_ratio": summary["effective_flops"] / summary["dense_flops"],
                })
    dense = runs["dense"]
    rows = {}
    for name in names:
        per_seed = runs[name]
        speedups = [d["step_time_s"] / r["step_time_s"] for d, r in zip(dense, per_seed)]
        deltas = [r["accuracy"] - d["accuracy"] for d, r in zip(dense, per_seed)]
        rows[name] = {
            "description": VARIANTS[name][0],
            "runs": per_seed,
            "accuracy": statistics.fmean(r["accuracy"] for r in per_seed),
            "accuracy_delta": statistics.fmean(deltas),
            "test_loss": statistics.fmean(r["test_loss"] for r in per_seed),
            "step_time_s": statistics.fmean(r["step_time_s"] for r in per_seed),
            "speedup": statistics.median(speedups),
            "flops_ratio": statistics.fmean(r["flops_ratio"] for r in per_seed),
        }
        rows[name]["meets_targets"] = (
            rows[name]["accuracy_delta"] >= -ACCURACY_MARGIN and rows[name]["speedup"] >= SPEEDUP_TARGET
        )
    return {
        "steps": steps,
        "seeds": seeds,
        "variants": rows,
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
    }


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"Main job (lightning-sft fit: sft-llama-5m, embedded arithmetic task, LoRA r 16) for {result['steps']} steps,"
        f" seeds {','.join(map(str, result['seeds']))}; torch {result['torch']}, {result['threads']} threads,"
        f" {result['seconds'] / 60:.1f} min",
        "accuracy = held-out exact match (500 test questions); step time = mean over the whole fit (dense warm-up and"
        " calibration included); speedup = median over seeds of dense / variant step time",
        "",
    ]
    for name, row in result["variants"].items():
        lines.append(f"{name:<12} {row['description']}")
    lines += ["", f"{'variant':<12} {'accuracy per seed':>22} {'mean':>7} {'vs dense':>9} {'test loss':>10}"
                  f" {'step s':>7} {'speedup':>8} {'FLOPs':>6}"]
    for name, row in result["variants"].items():
        seeds = " ".join(f"{r['accuracy'] * 100:5.1f}" for r in row["runs"])
        lines.append(
            f"{name:<12} {seeds:>22} {row['accuracy'] * 100:6.1f}% {row['accuracy_delta'] * 100:+8.1f} "
            f"{row['test_loss']:10.4f} {row['step_time_s']:7.3f} {row['speedup']:7.2f}x {row['flops_ratio']:6.3f}"
        )
    met = [name for name, row in result["variants"].items() if name != "dense" and row["meets_targets"]]
    lines += ["", f"within {ACCURACY_MARGIN * 100:.0f} point of dense and >= {SPEEDUP_TARGET}x faster: "
                  + (", ".join(met) if met else "none")]
    return "\n".join(lines)
