"""Sparse fine-tuning against LoRA with the same number of trainable parameters, and the diff it saves.

(a) Quality: the README's main job (``lightning-sft fit`` on the shipped ``sft-llama-5m`` base and the
embedded arithmetic task, each run in its own process) with ``SparseFineTuning`` at ``--density`` for
each selection, against LoRA whose per-module ranks are chosen so its trainable parameters match the
sparse run's (alpha = 2r, the main job's alpha/r). Held-out test loss and exact match.

(b) The diff the first sparse run saved: its bytes against the ideal (changed entries x value bytes),
against the full checkpoint (the base's ``model.safetensors``, what a full fine-tune stores) and
against the LoRA run's adapter file.

(c) Apply time: ``apply_diff`` / ``revert_diff`` of that diff on the shipped base (median of
``--repeats``), and of a random diff at the same density on a larger random-init LLaMA, to show
how it scales; every revert is checked to restore the base bit for bit.
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
from torch import nn

from lightning_sft.adapters.targeting import ALL_LINEAR, select_targets
from lightning_sft.anatomy.linear import linear_features
from lightning_sft.assets import SHIPPED_MODELS
from lightning_sft.bench.common import build_llama, main_job_summary, run_and_report
from lightning_sft.validation import int_at_least
from lightning_sft.fingerprint import base_parameters
from lightning_sft.modules.causal_lm import build_model
from lightning_sft.sparse_ft.diff import make_diff
from lightning_sft.sparse_ft.diff_file import read_diff, write_diff
from lightning_sft.sparse_ft.diff_module import apply_diff, revert_diff
from lightning_sft.sparse_ft.selection import SELECTIONS, entry_count, random_importance, top_entries

NAME = "sft"
HELP = "sparse fine-tuning against LoRA with as many trainable parameters, diff size and apply time"
SIZE_TARGET = 1.5  # diff bytes over the ideal
BASE = "sft-llama-5m"


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]; got {text!r}")
    return value


def _selections(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in SELECTIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"must be comma-separated names from {', '.join(SELECTIONS)}; got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--density", type=_fraction, default=0.01, help="fraction of each weight trained (default 0.01)")
    parser.add_argument("--selections", type=_selections, default=["fisher", "random"],
                        help="comma-separated selections to train (default fisher,random; the first one's diff is measured)")
    parser.add_argument("--sft-lr", type=float, default=0.03, help="peak learning rate of the sparse runs (default 0.03)")
    parser.add_argument("--steps", type=int_at_least(40), default=600, help="optimizer steps per fit (default 600)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of every fit (default 0)")
    parser.add_argument("--repeats", type=int_at_least(1), default=5, help="timed apply/revert repeats (default 5)")
    parser.add_argument("--apply-hidden", type=int_at_least(0), default=1024,
                        help="hidden size of the larger random-init model for (c); 0 skips it (default 1024)")
    parser.add_argument("--apply-layers", type=int_at_least(1), default=8, help="its blocks (default 8)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lightning-sft bench sft``."""
    return run_and_report(
        args.threads, args.json,
        lambda: benchmark(args.density, args.selections, args.sft_lr, args.steps, args.seed, args.repeats,
                          args.apply_hidden, args.apply_layers, args.threads),
        format_report,
    )


def sparse_count(model: nn.Module, density: float) -> int:
    """Trainable entries of ``SparseFineTuning(density)`` on ``model``'s linear layers (output heads excluded)."""
    return sum(entry_count(model.get_submodule(name).weight.numel(), density)
               for name in select_targets(model, ALL_LINEAR, None))


def matching_lora_ranks(model: nn.Module, target: int) -> tuple[int, dict[str, int], int]:
    """LoRA ranks with about ``target`` trainable parameters: one rank everywhere, one more on the
    largest modules while that brings the count closer. Returns (rank, rank_pattern, parameters)."""
    widths = {}
    for name in select_targets(model, ALL_LINEAR, None):
        in_features, out_features = linear_features(model.get_submodule(name))
        widths[name] = in_features + out_features  # parameters per unit of rank
    rank = max(1, target // sum(widths.values()))
    params = rank * sum(widths.values())
    pattern = {}
    for name in sorted(widths, key=lambda n: (-widths[n], n)):
        if abs(params + widths[name] - target) < abs(params - target):
            pattern[name] = rank + 1
            params += widths[name]
    return rank, pattern, params


def sft_flags(density: float, selection: str, lr: float) -> list[str]:
    return ["--trainer.callbacks+=SparseFineTuning", "--trainer.callbacks.density", str(density),
            "--trainer.callbacks.selection", selection, "--model.lr", str(lr)]


def lora_flags(rank: int, pattern: dict[str, int]) -> list[str]:
    alphas = {name: 2 * r for name, r in pattern.items()}
    return ["--lora.r", str(rank), "--lora.alpha", str(2 * rank), "--lora.rank_pattern", json.dumps(pattern),
            "--lora.alpha_pattern", json.dumps(alphas)]


def _fit(flags: list[str], seed: int, steps: int, root: Path, threads: int | None) -> dict[str, Any]:
    """One main-job run in a fresh process; its summary.json (a seam the tests replace)."""
    return main_job_summary(flags, seed, steps, root, threads)


def _quality_row(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: summary[key] for key in ("test_loss_after", "test_acc_after", "trainable_params", "mean_step_time_s")}


def benchmark(
    density: float, selections: list[str], sft_lr: float, steps: int, seed: int, repeats: int,
    apply_hidden: int, apply_layers: int, threads: int | None,
) -> dict[str, Any]:
    base = build_model(BASE)
    target = sparse_count(base, density)
    rank, pattern, lora_params = matching_lora_ranks(base, target)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        summaries = {f"sft-{s}": _fit(sft_flags(density, s, sft_lr), seed, steps, root / s, threads) for s in selections}
        summaries["lora"] = _fit(lora_flags(rank, pattern), seed, steps, root / "lora", threads)
        runs = {name: _quality_row(summary) for name, summary in summaries.items()}
        diff_path = Path(summaries[f"sft-{selections[0]}"]["diff"])
        adapter = Path(summaries["lora"]["adapter"]) / "adapter_model.safetensors"
        size = diff_size(diff_path, SHIPPED_MODELS[BASE] / "model.safetensors", adapter)
        timing = {"shipped": apply_timing(base, diff_path, repeats)}
    if apply_hidden:
        timing["larger"] = larger_apply_timing(apply_hidden, apply_layers, density, repeats, seed)
    return {
        "steps": steps, "seed": seed, "density": density, "sft_lr": sft_lr, "lora_rank": rank,
        "lora_rank_pattern": pattern, "lora_params": lora_params, "sft_params": target, "runs": runs,
        "size": size, "apply": timing, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def diff_size(diff_path: Path, checkpoint: Path, adapter: Path) -> dict[str, Any]:
    diff = read_diff(diff_path)
    size = diff_path.stat().st_size
    return {
        "file_bytes": size, "ideal_bytes": diff.ideal_bytes, "vs_ideal": size / diff.ideal_bytes,
        "checkpoint_bytes": checkpoint.stat().st_size, "vs_checkpoint": size / checkpoint.stat().st_size,
        "adapter_bytes": adapter.stat().st_size, "vs_adapter": size / adapter.stat().st_size,
        "nnz": diff.nnz, "fixups": sum(t.fixup_positions.numel() for t in diff.tensors.values()),
        "meets_target": size / diff.ideal_bytes <= SIZE_TARGET,
    }


def apply_timing(model: nn.Module, diff_path: Path, repeats: int) -> dict[str, Any]:
    """Median seconds of apply_diff and revert_diff (each reads and checks the file), base restored each time."""
    before = {name: p.detach().clone() for name, p in base_parameters(model).items()}
    applies, reverts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        apply_diff(model, diff_path)
        applies.append(time.perf_counter() - start)
        start = time.perf_counter()
        revert_diff(model, diff_path)
        reverts.append(time.perf_counter() - start)
    restored = all(torch.equal(p, before[name]) for name, p in base_parameters(model).items())
    return {
        "params": sum(p.numel() for p in before.values()), "nnz": read_diff(diff_path).nnz,
        "apply_s": statistics.median(applies), "revert_s": statistics.median(reverts), "restored_exactly": restored,
    }


def larger_apply_timing(hidden: int, layers: int, density: float, repeats: int, seed: int) -> dict[str, Any]:
    """The same on a random-init LLaMA of ``hidden`` x ``layers`` with a random diff of ``density``."""
    model = build_llama(32000, hidden, int(hidden * 11 / 4), layers, max(1, hidden // 64), max(1, hidden // 256), 2048, seed)
    params = base_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    updates = {}
    for name in select_targets(model, ALL_LINEAR, None):
        weight = params[f"{name}.weight"].detach().reshape(-1)
        indices = top_entries(random_importance(weight.numel(), generator), entry_count(weight.numel(), density))
        updates[f"{name}.weight"] = (indices, weight[indices] + 0.01 * torch.randn(indices.numel(), generator=generator))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_diff(make_diff(params, updates, {"source": "bench"}), Path(tmp) / "diff.safetensors")
        result = apply_timing(model, path, repeats)
        result["file_bytes"] = path.stat().st_size
    return {"hidden": hidden, "layers": layers, **result}


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"(a) main job, {result['steps']} steps, seed {result['seed']}: sparse fine-tuning at density"
        f" {result['density']:.2%} (lr {result['sft_lr']:g}) against LoRA r={result['lora_rank']}"
        f" (+1 on {len(result['lora_rank_pattern'])} modules) with {result['lora_params']:,} parameters"
        f" ({result['lora_params'] / result['sft_params']:.3f}x the sparse runs' {result['sft_params']:,});"
        f" torch {result['torch']}, {result['threads']} threads",
        f"{'run':>12} {'test loss':>10} {'exact match':>12} {'trainable':>10} {'step s':>8}",
    ]
    for name, row in result["runs"].items():
        lines.append(f"{name:>12} {row['test_loss_after']:>10.4f} {row['test_acc_after']:>12.1%}"
                     f" {row['trainable_params']:>10,} {row['mean_step_time_s']:>8.3f}")
    size = result["size"]
    lines += [
        "",
        f"(b) the diff: {size['file_bytes']:,} bytes for {size['nnz']:,} entries ({size['fixups']:,} exact-revert fixups);"
        f" {size['vs_ideal']:.2f}x the ideal {size['ideal_bytes']:,} bytes (target <= {SIZE_TARGET}x:"
        f" {'met' if size['meets_target'] else 'not met'}); {size['vs_checkpoint']:.2%} of the full checkpoint"
        f" ({size['checkpoint_bytes']:,} bytes); {size['vs_adapter']:.2f}x the LoRA adapter ({size['adapter_bytes']:,} bytes)",
        "",
        "(c) apply / revert (read, checks and in-place write; median), base restored bit for bit:",
    ]
    for name, row in result["apply"].items():
        shape = f"hidden {row['hidden']} x {row['layers']} blocks, " if "hidden" in row else ""
        lines.append(
            f"{name:>8}: {shape}{row['params'] / 1e6:.1f}M parameters, {row['nnz']:,} entries: apply"
            f" {row['apply_s'] * 1e3:.1f} ms, revert {row['revert_s'] * 1e3:.1f} ms,"
            f" restored exactly: {'yes' if row['restored_exactly'] else 'NO'}"
        )
    return "\n".join(lines)
