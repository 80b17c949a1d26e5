"""``lightning-sft bench memory``: the memory model against measured training steps on this CPU.

Each configuration runs two real Lightning training steps on a random-init model (this package's
callbacks switch the method and recipes on) and measures the second with ``memory_harness``; the
estimate for the same setup is computed beside it. Targets: every component within 5%, the peak
within 10%.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from typing import Any

from lightning_sft.bench.common import run_and_report
from lightning_sft.validation import int_at_least
from lightning_sft.memory.estimate import COMPONENTS, estimate
from lightning_sft.memory.setup import TrainingSetup

NAME = "memory"
HELP = "Memory model vs measured training steps (weights, gradients, optimizer, activations, logits, temporaries, peak)."

_LLAMA = {
    "model_type": "llama", "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
}
_QWEN2 = {**_LLAMA, "model_type": "qwen2", "tie_word_embeddings": True}  # q/k/v biases, tied head
_GPT2 = {"model_type": "gpt2", "vocab_size": 2048, "n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 256}
_LLAMA_32K = {**_LLAMA, "vocab_size": 32000, "num_hidden_layers": 2}  # a real vocabulary: the loss's share
MODELS = {"llama": _LLAMA, "llama-tied": {**_LLAMA, "tie_word_embeddings": True}, "qwen2": _QWEN2, "gpt2": _GPT2,
          "llama-32k": _LLAMA_32K}

_OFFLOAD = {"offload_activations": True, "offload_min_bytes": 2**16}
# (model, setup options): every method, both precisions, both attention kernels, and each recipe.
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("llama", {"method": "full", "precision": "32-true", "attention": "eager"}),
    ("llama", {"method": "full", "precision": "32-true", "attention": "sdpa", "optimizer": "sgd"}),
    ("llama", {"method": "full", "precision": "bf16-true", "attention": "sdpa"}),
    ("llama", {"method": "full", "precision": "bf16-true", "attention": "sdpa", "optimizer": "adamw8bit"}),
    ("llama", {"method": "full", "precision": "32-true", "attention": "sdpa", "gradient_checkpointing": True}),
    ("llama-tied", {"method": "full", "precision": "bf16-true", "attention": "sdpa"}),
    ("llama", {"method": "lora", "precision": "32-true", "attention": "sdpa"}),
    ("llama", {"method": "lora", "precision": "bf16-true", "attention": "eager"}),
    ("llama", {"method": "lora", "precision": "bf16-true", "attention": "sdpa", "gradient_checkpointing": True}),
    ("llama", {"method": "qlora", "precision": "bf16-true", "attention": "sdpa"}),
    ("llama", {"method": "sft", "precision": "32-true", "attention": "sdpa"}),
    ("qwen2", {"method": "lora", "precision": "bf16-true", "attention": "sdpa"}),
    ("gpt2", {"method": "full", "precision": "32-true", "attention": "eager"}),
    ("gpt2", {"method": "lora", "precision": "32-true", "attention": "eager"}),
    # the loss of a 32k vocabulary at 2 x 512 tokens, unfused and fused (FusedCrossEntropy)
    ("llama-32k", {"method": "lora", "precision": "32-true", "attention": "sdpa", "batch": 2, "seq": 512}),
    ("llama-32k", {"method": "lora", "precision": "32-true", "attention": "sdpa", "batch": 2, "seq": 512,
                   "fused_ce": True}),
    ("llama-32k", {"method": "lora", "precision": "bf16-true", "attention": "sdpa", "batch": 2, "seq": 512,
                   "fused_ce": True}),
    ("llama-32k", {"method": "lora", "precision": "bf16-true", "attention": "sdpa", "batch": 2, "seq": 512,
                   "gradient_checkpointing": True, "fused_ce": True}),
    ("llama-32k", {"method": "full", "precision": "32-true", "attention": "sdpa", "batch": 2, "seq": 512,
                   "fused_ce": True}),
    # activation offloading (ActivationOffloading; on CPU its copies stay in CPU memory and count as host
    # memory), moving saved tensors of 64 KiB and more at these small shapes
    ("llama", {"method": "lora", "precision": "32-true", "attention": "sdpa", **_OFFLOAD}),
    ("llama", {"method": "lora", "precision": "bf16-true", "attention": "sdpa", "gradient_checkpointing": True,
               **_OFFLOAD}),
    ("llama", {"method": "full", "precision": "32-true", "attention": "sdpa", **_OFFLOAD}),
    ("gpt2", {"method": "lora", "precision": "32-true", "attention": "eager", **_OFFLOAD}),
    ("llama-32k", {"method": "lora", "precision": "bf16-true", "attention": "sdpa", "batch": 2, "seq": 512,
                   "fused_ce": True, **_OFFLOAD}),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int_at_least(1), default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq", type=int_at_least(2), default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="run these configuration numbers (1-based)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def measured_sizes(measurement: Any) -> dict[str, int]:
    """The component sizes a measurement gives (temporaries exist only at the peak)."""
    return {
        "weights": measurement.components["weights"],
        "gradients": measurement.gradients_total,
        "optimizer": measurement.components["optimizer"],
        "activations": measurement.activations_total,
        "logits": measurement.logits_total,
        "temporaries": measurement.components["temporaries"],
    }


def compare(model: str, options: dict[str, Any], batch: int, seq: int) -> dict[str, Any]:
    """One configuration: measured and estimated sizes, peak and the relative errors."""
    from lightning_sft.bench.memory_harness import measure

    setup = TrainingSetup(**{"batch": batch, "seq": seq, "device": "cpu", **options})  # a row may fix its size
    measurement = measure(MODELS[model], setup)
    guess = estimate(MODELS[model], setup)
    measured = measured_sizes(measurement)
    estimated = {**guess.sizes, "temporaries": guess.at_peak["temporaries"]}
    errors = {c: _error(estimated[c], measured[c]) for c in COMPONENTS}
    return {
        "model": model, "setup": options, "measured": measured, "estimated": estimated, "errors": errors,
        "peak": {"measured": measurement.peak, "estimated": guess.peak, "error": _error(guess.peak, measurement.peak)},
        "phase": {"measured": measurement.phase, "estimated": guess.phase},
        "host": {"measured": measurement.host_peak, "estimated": guess.host,
                 "error": _error(guess.host, measurement.host_peak)},
        "saved_for_backward": measurement.saved_bytes,
    }


def _error(estimated: int, measured: int) -> float:
    if measured == 0:
        return 0.0 if estimated == 0 else float("inf")
    return (estimated - measured) / measured


def _describe(options: dict[str, Any]) -> str:
    words = [options["method"], options["precision"], options["attention"]]
    words += [options["optimizer"]] if "optimizer" in options else []
    words += ["checkpointing"] if options.get("gradient_checkpointing") else []
    words += ["fused CE"] if options.get("fused_ce") else []
    words += [f"offload >= {options['offload_min_bytes'] // 1024} KiB"] if options.get("offload_activations") else []
    words += [f"{options['batch']}x{options['seq']}"] if "seq" in options else []
    return " ".join(words)


def run(args: argparse.Namespace) -> int:
    chosen = [CONFIGS[i - 1] for i in args.only] if args.only else CONFIGS

    def measure_all() -> dict[str, Any]:
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = [compare(model, options, args.batch, args.seq) for model, options in chosen]
        worst_component = max(abs(e) for row in rows for e in row["errors"].values())
        worst_peak = max(abs(row["peak"]["error"]) for row in rows)
        worst_host = max(abs(row["host"]["error"]) for row in rows)
        return {"batch": args.batch, "seq": args.seq, "rows": rows, "worst_component": worst_component,
                "worst_peak": worst_peak, "worst_host": worst_host}

    return run_and_report(args.threads, args.json, measure_all, format_report)


def format_report(result: dict[str, Any]) -> str:
    header = ("| # | model | setup | " + " | ".join(f"{c} KiB (err)" for c in COMPONENTS)
              + " | peak KiB (err) | peak at | host KiB (err) |")
    lines = [
        f"Memory model vs measurement: batch {result['batch']}, seq {result['seq']}, second training step, CPU.",
        "",
        header,
        "|---|---|---|" + "---|" * (len(COMPONENTS) + 3),
    ]
    for i, row in enumerate(result["rows"], 1):
        cells = [f"{row['measured'][c] / 1024:,.0f} ({100 * row['errors'][c]:+.1f}%)" for c in COMPONENTS]
        peak = row["peak"]
        phase = row["phase"]["measured"] + ("" if row["phase"]["measured"] == row["phase"]["estimated"] else f" (est. {row['phase']['estimated']})")
        host = row["host"]
        host_cell = f"{host['measured'] / 1024:,.0f} ({100 * host['error']:+.1f}%)" if host["measured"] or host["estimated"] else "-"
        lines.append(
            f"| {i} | {row['model']} | {_describe(row['setup'])} | " + " | ".join(cells)
            + f" | {peak['measured'] / 1024:,.0f} ({100 * peak['error']:+.2f}%) | {phase} | {host_cell} |"
        )
    component_ok = result["worst_component"] <= 0.05
    peak_ok = result["worst_peak"] <= 0.10
    lines += [
        "",
        f"Worst component error {100 * result['worst_component']:.2f}% (target 5%: {'met' if component_ok else 'NOT met'});"
        f" worst peak error {100 * result['worst_peak']:.2f}% (target 10%: {'met' if peak_ok else 'NOT met'});"
        f" worst host-memory error {100 * result['worst_host']:.2f}% (offloaded activations; target 5%:"
        f" {'met' if result['worst_host'] <= 0.05 else 'NOT met'}).",
    ]
    return "\n".join(lines)
