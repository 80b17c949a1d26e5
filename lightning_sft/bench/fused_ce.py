"""``lightning-sft bench fused-ce``: a causal LM's training step with and without the fused loss.

A random-init LLaMA-shaped model with a 32k vocabulary (LoRA r=16 on every block linear) runs forward and
backward on the same batch, its own loss against ``FusedCrossEntropy``'s (``recipes.fused_loss``): the
peak of live tensors in one step (``memory.tracker.LiveTensors``), the loss and input-gradient agreement,
and the step time as paired ratios of interleaved rounds. The memory model's components for the same
setups are checked by ``lightning-sft bench memory`` (its llama-32k rows).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from lightning_sft.bench.common import build_llama, run_and_report
from lightning_sft.bench.timing import interleaved, paired_ratios
from lightning_sft.validation import int_at_least

NAME = "fused-ce"
HELP = "a training step with the fused linear cross-entropy against the model's own loss: peak memory, step time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=int_at_least(2), default=32000, help="vocabulary (default 32000)")
    parser.add_argument("--seq", type=int_at_least(2), default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--batch", type=int_at_least(1), default=2, help="sequences (default 2)")
    parser.add_argument("--steps", type=int_at_least(1), default=6, help="timed rounds (default 6)")
    parser.add_argument("--chunk", type=int_at_least(1), default=None, help="tokens per chunk (default: the loss's own)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lightning-sft bench fused-ce``."""
    return run_and_report(args.threads, args.json, lambda: measure(args.vocab, args.seq, args.batch, args.steps, args.chunk),
                          format_report)


def measure(vocab: int, seq: int, batch: int, steps: int, chunk: int | None = None) -> dict[str, Any]:
    """Peak, agreement and paired step-time ratios (fused / own) of one model, fp32 on this CPU."""
    from lightning_sft.adapters import LoRAConfig, inject_lora
    from lightning_sft.memory.tracker import LiveTensors
    from lightning_sft.recipes.fused_loss import FusedLoss, causal_lms

    model = build_llama(vocab, 128, 384, 2, 4, 2, seq, seed=0)
    inject_lora(model, LoRAConfig(r=16), torch.Generator().manual_seed(0))
    fused = FusedLoss(causal_lms(model), chunk)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    trained = [p for p in model.parameters() if p.requires_grad]

    def step(use_fused: bool) -> tuple[float, list[torch.Tensor]]:
        if use_fused:
            fused.install()
        try:
            loss = model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, trained)
        finally:
            if use_fused:
                fused.remove()
        return float(loss), list(grads)

    peaks, results = {}, {}
    for name, use in (("own", False), ("fused", True)):
        with LiveTensors() as tracker:
            results[name] = step(use)
        peaks[name] = tracker.peak
    (own_loss, own_grads), (fused_loss, fused_grads) = results["own"], results["fused"]
    times = interleaved({"own": lambda: step(False), "fused": lambda: step(True)}, steps, warmup=1)
    ratios = paired_ratios(times["fused"], times["own"])
    return {
        "vocab": vocab, "seq": seq, "batch": batch, "lora_r": 16, "chunk": chunk, "peak_bytes": peaks,
        "loss_difference": abs(fused_loss - own_loss),
        "max_gradient_difference": max(float((a - b).abs().max()) for a, b in zip(fused_grads, own_grads)),
        "step_seconds": {name: statistics.median(values) for name, values in times.items()},
        "time_ratio_median": statistics.median(ratios), "time_ratios": ratios,
    }


def format_report(result: dict[str, Any]) -> str:
    own, fused = result["peak_bytes"]["own"], result["peak_bytes"]["fused"]
    return "\n".join([
        f"LLaMA-shaped, vocab {result['vocab']:,}, {result['batch']} x {result['seq']} tokens, LoRA r={result['lora_r']},"
        f" fp32, CPU, chunk {result['chunk'] or 'default'}; one forward + backward:",
        f"  peak of live tensors: own loss {own / 2**20:.1f} MiB, fused {fused / 2**20:.1f} MiB ({fused / own - 1:+.1%})",
        f"  loss difference {result['loss_difference']:.2e}, largest LoRA gradient difference"
        f" {result['max_gradient_difference']:.2e}",
        f"  step time fused / own: median {result['time_ratio_median']:.3f} over {len(result['time_ratios'])} paired"
        f" rounds (own {result['step_seconds']['own']:.3f} s, fused {result['step_seconds']['fused']:.3f} s)",
    ])
