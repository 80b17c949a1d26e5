"""LoRA training-step benchmark: our ``LoRALinear`` against HF peft on one LLaMA-shaped model.

Both variants start from deep copies of the same randomly initialised model and carry identical
adapter weights, and their first-step losses are checked to agree before any timing, so the
comparison is like for like: the only difference is whose LoRA layer runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_sft.adapters import LoRAConfig, inject_lora
from lightning_sft.bench.common import build_llama, run_and_report
from lightning_sft.validation import int_at_least
from lightning_sft.bench.timing import interleaved, paired_ratios, summarize

NAME = "lora"
HELP = "training-step time of our LoRA against HF peft on a LLaMA-shaped model"
LOSS_TOLERANCE = 1e-5
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRABenchSettings:
    """Model and run sizes. Defaults take about two minutes on a 2-core CPU."""

    hidden: int = field(default=1024, metadata={"help": "hidden size"})
    intermediate: int = field(default=2816, metadata={"help": "MLP intermediate size"})
    layers: int = field(default=4, metadata={"help": "decoder layers"})
    heads: int = field(default=16, metadata={"help": "attention heads"})
    kv_heads: int = field(default=4, metadata={"help": "key/value heads (grouped-query attention)"})
    vocab: int = field(default=4096, metadata={"help": "vocabulary size"})
    seq: int = field(default=256, metadata={"help": "sequence length"})
    batch: int = field(default=4, metadata={"help": "batch size"})
    r: int = field(default=16, metadata={"help": "LoRA rank (alpha = 2r, all linear layers but the head)"})
    warmup: int = field(default=3, metadata={"help": "untimed steps per variant after the loss check"})
    steps: int = field(default=10, metadata={"help": "timed steps per variant, alternating ours/peft"})
    seed: int = field(default=0, metadata={"help": "seed for weights, adapters and token ids"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(LoRABenchSettings):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=int_at_least(0 if f.name in ("warmup", "seed") else 1),
            default=f.default,
            help=f"{f.metadata['help']} (default {f.default})",
        )
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lightning-sft bench lora``."""
    try:
        import peft  # noqa: F401  (optional: only this benchmark needs it)
    except ImportError:
        print(
            "lightning-sft bench lora compares against HF peft, which is not installed: run `pip install peft`"
            " (or `pip install -e '.[dev]'`).",
            file=sys.stderr,
        )
        return 1
    settings = LoRABenchSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LoRABenchSettings)})
    return run_and_report(args.threads, args.json, lambda: benchmark(settings), format_report)


def build_model(settings: LoRABenchSettings) -> nn.Module:
    return build_llama(settings.vocab, settings.hidden, settings.intermediate, settings.layers, settings.heads,
                       settings.kv_heads, settings.seq, settings.seed)


def build_variants(settings: LoRABenchSettings) -> tuple[nn.Module, nn.Module]:
    """(ours, peft) on copies of one base model, with equal adapter weights.

    B is drawn small but non-zero: with the usual zero init every adapter is a no-op, and the
    first-step loss check could not tell a wrong adapter path from a right one.
    """
    import peft

    base = build_model(settings)
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(r=settings.r, alpha=2 * settings.r, target_modules="all-linear"))
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 API deprecated for v6; noise in a benchmark report.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        theirs = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(r=settings.r, lora_alpha=2 * settings.r, target_modules="all-linear", lora_dropout=0.0),
        )
    generator = torch.Generator().manual_seed(settings.seed + 1)
    ours_params = {name: p for name, p in ours.named_parameters() if p.requires_grad}
    peft_params = {
        name.removeprefix(_PEFT_PREFIX).removesuffix(".default.weight"): p
        for name, p in theirs.named_parameters()
        if p.requires_grad
    }
    if ours_params.keys() != peft_params.keys():
        raise AssertionError(
            "ours and peft adapt different layers: only ours "
            f"{sorted(ours_params.keys() - peft_params.keys())[:4]}, only peft {sorted(peft_params.keys() - ours_params.keys())[:4]}"
        )
    with torch.no_grad():
        for name, param in ours_params.items():
            if name.endswith(".lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            peft_params[name].copy_(param)
    return ours, theirs


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_step(model: nn.Module, tokens: torch.Tensor) -> Callable[[], float]:
    """One causal-LM step (forward, backward, AdamW) over the trainable parameters; returns the loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def benchmark(settings: LoRABenchSettings) -> dict[str, Any]:
    """Build, check, and time both variants; returns JSON-serialisable results."""
    import peft
    import transformers

    ours, theirs = build_variants(settings)
    params = {"ours": trainable_parameters(ours), "peft": trainable_parameters(theirs)}
    if params["ours"] != params["peft"]:
        raise AssertionError(f"Trainable parameter counts differ: {params}; the comparison would not be like for like.")
    generator = torch.Generator().manual_seed(settings.seed + 2)
    tokens = torch.randint(settings.vocab, (settings.batch, settings.seq), generator=generator)
    steps = {"ours": train_step(ours, tokens), "peft": train_step(theirs, tokens)}
    first_loss = {name: step() for name, step in steps.items()}
    loss_diff = abs(first_loss["ours"] - first_loss["peft"])
    if not loss_diff <= LOSS_TOLERANCE:
        raise AssertionError(f"First-step losses differ by {loss_diff:.3g} (> {LOSS_TOLERANCE}): {first_loss}.")
    times = interleaved(steps, steps=settings.steps, warmup=settings.warmup)
    summaries = {name: summarize(samples) for name, samples in times.items()}
    per_round = summarize(paired_ratios(times["ours"], times["peft"]))
    tokens_per_step = settings.batch * settings.seq
    return {
        "settings": dataclasses.asdict(settings),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "first_step_loss": first_loss,
        "first_step_loss_abs_diff": loss_diff,
        "variants": {
            name: {
                "median_s": s.median,
                "q1_s": s.q1,
                "q3_s": s.q3,
                "iqr_s": s.iqr,
                "tokens_per_s": tokens_per_step / s.median,
                "trainable_params": params[name],
                "step_times_s": times[name],
            }
            for name, s in summaries.items()
        },
        "ratio_ours_over_peft": summaries["ours"].median / summaries["peft"].median,
        "per_round_ratio": {"median": per_round.median, "q1": per_round.q1, "q3": per_round.q3},
    }


def format_report(result: dict[str, Any]) -> str:
    s = result["settings"]
    loss = result["first_step_loss"]
    threads = f"{result['threads']} thread" + ("s" if result["threads"] != 1 else "")
    lines = [
        f"LoRA train step (fwd+bwd+AdamW), LLaMA-shaped: hidden {s['hidden']}, intermediate {s['intermediate']},"
        f" {s['layers']} layers, {s['heads']}/{s['kv_heads']} heads, vocab {s['vocab']}; batch {s['batch']} x seq"
        f" {s['seq']}; r {s['r']}, alpha {2 * s['r']}, all-linear; fp32, {threads}",
        f"torch {result['versions']['torch']}, transformers {result['versions']['transformers']},"
        f" peft {result['versions']['peft']}; {s['warmup']} warm-up + {s['steps']} timed steps each, alternating",
        f"first-step loss: ours {loss['ours']:.6f}, peft {loss['peft']:.6f} (|diff| {result['first_step_loss_abs_diff']:.1e})",
        "",
        f"{'variant':<8}{'median s/step':>15}{'IQR s':>10}{'tokens/s':>11}{'trainable params':>18}",
    ]
    for name, v in result["variants"].items():
        lines.append(
            f"{name:<8}{v['median_s']:>15.4f}{v['iqr_s']:>10.4f}{v['tokens_per_s']:>11.1f}{v['trainable_params']:>18,}"
        )
    per_round = result["per_round_ratio"]
    lines.append(
        f"per-round ours/peft: median {per_round['median']:.2f}x, IQR {per_round['q1']:.2f}-{per_round['q3']:.2f}x"
    )
    lines.append(f"ours/peft step time: {result['ratio_ours_over_peft']:.2f}x (target <= 1.0x)")
    return "\n".join(lines)
