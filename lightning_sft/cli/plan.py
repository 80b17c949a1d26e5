"""``lightning-sft plan``: which fine-tuning recipes fit a GPU budget, and which to use."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from lightning_sft.assets import SHIPPED_MODELS
from lightning_sft.usage import UsageParser
from lightning_sft.validation import int_at_least
from lightning_sft.memory.estimate import COMPONENTS
from lightning_sft.memory.planner import (
    GIB, GPU_FLOPS, HOST_LINK_BYTES_PER_S, OFFLOAD_OVERHEAD, PLAN_METHODS, QLORA_OVERHEAD, RESERVED_BYTES, ZERO3_OVERHEAD, NothingFits, Plan,
    plan,
)
from lightning_sft.memory.shapes import PRESETS

_UNITS = {"": GIB, "g": GIB, "gb": GIB, "gib": GIB, "m": 2**20, "mb": 2**20, "mib": 2**20, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """``24GB``, ``24GiB``, ``80G``, ``16000MB`` or a bare number of GiB -> bytes. GPU memory is
    binary (a "24 GB" card holds 24 GiB), so GB and GiB both mean 2**30 bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"use a positive size such as 24GB, 80GiB or 16000MB; got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [m for m in methods if m not in PLAN_METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"use a comma-separated subset of {','.join(PLAN_METHODS)}; got {text!r}")
    return methods


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="lightning-sft plan",
        description="Estimate the memory of fine-tuning recipes (full, LoRA, QLoRA, sparse FT; gradient checkpointing,"
        " 8-bit AdamW, fused cross-entropy, activation offloading, ZeRO) for a model on a GPU budget, and recommend"
        " the fastest that fits. See docs/memory.md.",
    )
    parser.add_argument("--model", required=True, help=f"a preset ({', '.join(sorted(PRESETS))}), a config.json, or a model directory")
    parser.add_argument("--gpu-mem", type=parse_size, required=True, help="memory per GPU, e.g. 24GB (binary: GiB)")
    parser.add_argument("--host-mem", type=parse_size, default=None,
                        help="host memory per GPU for offloaded activations, e.g. 64GB (default: not checked, only reported)")
    parser.add_argument("--gpus", type=int_at_least(1), default=1, help="number of GPUs (default 1)")
    parser.add_argument("--seq", type=int_at_least(1), default=2048, help="sequence length in tokens (default 2048)")
    parser.add_argument("--batch", type=int_at_least(1), default=4, help="micro-batch per GPU (default 4)")
    parser.add_argument("--lora-r", "--lora.r", type=int_at_least(1), default=16, help="LoRA rank (default 16; --lora.r as in fit)")
    parser.add_argument("--methods", type=_methods, default=PLAN_METHODS, help="comma-separated subset of full,lora,qlora,sft")
    parser.add_argument("--sharded", action="store_true",
                        help="weigh only the recipes that shard the model over the GPUs (FSDP2 / ZeRO); needs --gpus >= 2")
    parser.add_argument("--all", action="store_true", help="also list the recipes that do not fit")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def fit_command(result: Plan, model: str) -> str:
    """The ``lightning-sft fit`` command of the recommendation, always naming the planned model: what fit
    loads (a shipped model, a model directory, the directory of a config.json), or for a preset, which is
    only a shape here, a placeholder for its weights' directory, so a pasted command cannot silently train
    the demo model instead."""
    path = Path(model)
    if model in SHIPPED_MODELS or path.is_dir():
        target = model
    elif path.is_file():
        target = str(path.parent)
    else:
        target = f"DIR_OF_{model or 'MODEL'}"
    return f"lightning-sft fit --model.model {target} " + result.recommended.flags()


def format_plan(result: Plan, show_all: bool = False, model: str = "") -> str:
    s = result.shape
    lines = [
        f"{s.family}: {s.num_params() / 1e9:.2f}B parameters, {s.layers} layers, hidden {s.hidden}, vocab {s.vocab};"
        f" budget {result.budget / GIB:.1f} GiB per GPU ({RESERVED_BYTES / GIB:.0f} GiB kept for the CUDA context)"
        + (f", {result.host_budget / GIB:.1f} GiB of host memory per GPU." if result.host_budget else "."),
        "",
        "| recipe | fits | peak GiB | " + " | ".join(COMPONENTS) + " | peak at | host GiB | rel. speed |",
        "|---|---|---|" + "---|" * len(COMPONENTS) + "---|---|---|",
    ]
    for recipe in result.recipes:
        if not recipe.fits and not show_all:
            continue
        e = recipe.estimate
        parts = " | ".join(_gib(e.at_peak[c]) for c in COMPONENTS)
        lines.append(
            f"| {recipe.name()} | {'yes' if recipe.fits else 'no'} | {_gib(e.peak)} | {parts} | {e.phase}"
            f" | {_gib(e.host) if e.host else '-'} | {recipe.speed:.2f} |"
        )
    best, command = result.recommended, fit_command(result, model)
    placeholder = command.split()[3]
    lines += [
        "",
        f"Recommended: {best.name()} (peak {_gib(best.estimate.peak)} GiB, {best.estimate.trainable_params:,} trainable parameters"
        + (f", {_gib(best.estimate.host)} GiB of pinned host memory per GPU" if best.estimate.host else "") + ").",
        f"  {command}",
        *([f"  (replace {placeholder} by the directory of its Hugging Face weights)"]
          if placeholder.startswith("DIR_OF_") else []),
        "",
        "Components are per GPU at the step's peak; relative speed is a FLOP model (1.00 = fastest that fits), with"
        f" QLoRA dequantization assumed at +{QLORA_OVERHEAD:.0%} and ZeRO-3 communication at +{ZERO3_OVERHEAD:.0%} (not"
        f" measured here). Offloading adds +{OFFLOAD_OVERHEAD:.0%} and the time its copies take beyond the compute of their pass, at an assumed"
        f" {GPU_FLOPS / 1e12:.0f} TFLOP/s and {HOST_LINK_BYTES_PER_S / 1e9:.0f} GB/s host link; host GiB is the pinned host"
        " memory its activations take. bf16 weights, fused (SDPA) attention.",
    ]
    return "\n".join(lines)


def plan_json(result: Plan, model: str = "") -> dict:
    return {
        "model": {"family": result.shape.family, "params": result.shape.num_params()},
        "budget_bytes": result.budget,
        "recommended": result.recommended.name(),
        "recommended_flags": result.recommended.flags(),
        "recommended_command": fit_command(result, model),
        "recipes": [
            {
                "recipe": r.name(), "fits": r.fits, "speed": round(r.speed, 4), "peak_bytes": r.estimate.peak,
                "phase": r.estimate.phase, "at_peak": r.estimate.at_peak, "host_bytes": r.estimate.host,
                "setup": r.setup.__dict__, "flags": r.flags(),
            }
            for r in result.recipes
        ],
    }


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = plan(args.model, args.gpu_mem, args.gpus, args.seq, args.batch, args.methods, args.lora_r, args.sharded,
                      args.host_mem)
    except NothingFits as error:
        print(f"lightning-sft plan: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(plan_json(result, args.model), indent=2) if args.json else format_plan(result, args.all, args.model))
    return 0
