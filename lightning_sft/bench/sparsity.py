"""Contextual-sparsity (SparseLoRA) training-step benchmark: dense LoRA against sparse variants.

Every variant is a copy of one LoRA-injected model (LLaMA by default, ``--family`` for the others) that shares the frozen base
weights (only the adapters and the optimizer are per variant), so the comparison differs only in
which frozen products run sparse. Variants run one step each in turn (``interleaved``) after a
common warm-up. FLOPs are counted directly with ``FlopCounterMode`` on one step of each variant,
which sees the sliced matmuls the sparse kernels actually run; the wrappers' own analytic
``state.skipped_flops`` is reported next to it as a cross-check.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from lightning_sft.adapters import LoRAConfig, inject_lora
from lightning_sft.bench.common import build_llama, run_and_report
from lightning_sft.validation import int_at_least
from lightning_sft.bench.timing import interleaved, paired_ratios, summarize
from lightning_sft.sparsity.context import context_mask_from_labels
from lightning_sft.anatomy import describe
from lightning_sft.sparsity import SparsityState, resolve_layer_sparsity, sparse_blocks, sparsify
from lightning_sft.tasks.exact_match import IGNORE_INDEX

NAME = "sparsity"
HELP = "training-step time of contextual-sparse (SparseLoRA) LoRA against dense LoRA (LLaMA or --family)"
PRESET = "llama3-8b-math10k"
# The preset's values on its deep layers (MLP 3-30, attention 14-29 but 20 and 24).
DEEP_MLP, DEEP_ATTN = 0.99, 0.75
SPEEDUP_TARGET, IDEAL_TARGET, ESTIMATOR_TARGET = 1.6, 0.85, 0.03
HEADLINE = "math10k-all"  # the variant the targets are judged on: see VARIANTS


def _variants(layers: int) -> dict[str, tuple[str, list[float], list[float]]]:
    """name -> (description, MLP sparsity per layer, attention sparsity per layer)."""
    mlp, attn = (resolve_layer_sparsity(PRESET, layers, part=part) for part in ("mlp", "attn"))
    return {
        "dense": ("dense LoRA", [0.0] * layers, [0.0] * layers),
        "mlp50": ("uniform MLP 0.5 on every layer, attention dense", [0.5] * layers, [0.0] * layers),
        "math10k": (f"preset {PRESET} rescaled to {layers} layers", mlp, attn),
        HEADLINE: (
            f"preset's deep-layer values on every layer (MLP {DEEP_MLP}, attention {DEEP_ATTN})",
            [DEEP_MLP] * layers,
            [DEEP_ATTN] * layers,
        ),
    }


VARIANT_NAMES = tuple(_variants(4))


@dataclass(frozen=True)
class SparsityBenchSettings:
    """Model and run sizes: the SparseLoRA Math10K protocol (sequence 512, last 128 scored) on a
    4-layer slice of a LLaMA-1B-like shape, small enough for a 2-core CPU (see
    docs/benchmarks.md for the run time)."""

    hidden: int = field(default=2048, metadata={"help": "hidden size"})
    intermediate: int = field(default=5632, metadata={"help": "MLP intermediate size"})
    layers: int = field(default=4, metadata={"help": "decoder layers"})
    heads: int = field(default=32, metadata={"help": "attention heads"})
    kv_heads: int = field(default=4, metadata={"help": "key/value heads (grouped-query attention)"})
    vocab: int = field(default=4096, metadata={"help": "vocabulary size"})
    seq: int = field(default=512, metadata={"help": "sequence length"})
    output: int = field(default=128, metadata={"help": "scored (output) tokens at the end of each sequence"})
    batch: int = field(default=1, metadata={"help": "batch size"})
    r: int = field(default=16, metadata={"help": "LoRA rank (alpha = 2r, all linear layers but the head)"})
    rank: int = field(default=8, metadata={"help": "SVD estimator rank"})
    warmup: int = field(default=2, metadata={"help": "untimed rounds (one step of every variant each)"})
    steps: int = field(default=5, metadata={"help": "timed rounds, variants alternating"})
    seed: int = field(default=0, metadata={"help": "seed for weights and token ids"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(SparsityBenchSettings):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=int_at_least(0 if f.name in ("warmup", "seed") else 1),
            default=f.default,
            help=f"{f.metadata['help']} (default {f.default})",
        )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANT_NAMES),
        help=f"comma-separated subset of {', '.join(VARIANT_NAMES)}; dense always runs (default: all)",
    )
    parser.add_argument(
        "--family", choices=FAMILIES, default="llama",
        help="model family at these sizes (fused projections: phi3, gpt-neox, falcon, gpt2; default llama)",
    )
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--profile", type=int_at_least(0), default=0, metavar="N",
        help="also print each variant's N most expensive ops (self CPU time of one step; default 0: off)",
    )
    parser.add_argument(
        "--svd-cache", default=None, metavar="DIR",
        help="keep the estimators' SVD factors in DIR and reuse them on the next run (default: a temporary directory)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lightning-sft bench sparsity``."""
    settings = SparsityBenchSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SparsityBenchSettings)})
    if settings.output >= settings.seq:
        raise SystemExit(f"--output ({settings.output}) must be smaller than --seq ({settings.seq}): no context left.")
    chosen = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(VARIANT_NAMES))
    if unknown:
        raise SystemExit(f"Unknown variants {unknown}; valid: {', '.join(VARIANT_NAMES)}.")
    names = ["dense", *(name for name in VARIANT_NAMES if name in chosen and name != "dense")]
    return run_and_report(
        args.threads,
        args.json,
        lambda: benchmark(settings, names, profile_rows=args.profile, svd_cache=args.svd_cache, family=args.family),
        format_report,
    )


def _config(family: str, s: SparsityBenchSettings) -> Any:
    """The family's HF config at the benchmark's sizes (dropout off; no GQA where the family has none)."""
    import transformers as tf

    decoder = dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                   num_hidden_layers=s.layers, num_attention_heads=s.heads, max_position_embeddings=s.seq,
                   use_cache=False)
    configs: dict[str, Callable[[], Any]] = {
        "phi3": lambda: tf.Phi3Config(**decoder, num_key_value_heads=s.kv_heads, pad_token_id=0),
        "qwen3": lambda: tf.Qwen3Config(**decoder, num_key_value_heads=s.kv_heads, head_dim=s.hidden // s.heads),
        "gpt-neox": lambda: tf.GPTNeoXConfig(**decoder, hidden_dropout=0.0, attention_dropout=0.0),
        "falcon": lambda: tf.FalconConfig(
            vocab_size=s.vocab, hidden_size=s.hidden, ffn_hidden_size=s.intermediate, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, num_kv_heads=s.kv_heads, new_decoder_architecture=True, use_cache=False),
        "gpt2": lambda: tf.GPT2Config(vocab_size=s.vocab, n_embd=s.hidden, n_inner=s.intermediate, n_layer=s.layers,
                                      n_head=s.heads, n_positions=s.seq, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, use_cache=False),
        "opt": lambda: tf.OPTConfig(vocab_size=s.vocab, hidden_size=s.hidden, ffn_dim=s.intermediate,
                                    num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                    max_position_embeddings=s.seq, word_embed_proj_dim=s.hidden, dropout=0.0,
                                    use_cache=False),
    }
    return configs[family]()


FAMILIES = ("llama", "phi3", "qwen3", "gpt-neox", "falcon", "gpt2", "opt")


def build_base(settings: SparsityBenchSettings, family: str = "llama") -> nn.Module:
    """Random-init model of ``family`` with LoRA on all linear layers (base frozen), fp32, training mode."""
    if family == "llama":
        model = build_llama(settings.vocab, settings.hidden, settings.intermediate, settings.layers, settings.heads,
                            settings.kv_heads, settings.seq, settings.seed)
    else:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(settings.seed)
        model = AutoModelForCausalLM.from_config(_config(family, settings)).to(torch.float32).train()
    inject_lora(model, LoRAConfig(r=settings.r, alpha=2 * settings.r, target_modules="all-linear"))
    return model


def share_frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose frozen parameters are the original's tensors: one base in memory for all
    variants, while each variant trains its own adapters."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo)


class EstimatorTimer:
    """Wall time spent in the ``select`` calls of a model's estimators.

    Each estimator instance gets its bound ``select`` replaced by a timed one. CPU execution is
    synchronous, so a call's wall time is its whole cost, and two ``perf_counter`` reads per call
    (a few per layer per step) add nothing measurable.
    """

    def __init__(self, model: nn.Module) -> None:
        self.seconds = 0.0
        for block in sparse_blocks(model):
            for estimator in block.estimators.values():
                estimator.select = self._timed(estimator.select)

    def _timed(self, select: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            start = time.perf_counter()
            try:
                return select(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


@dataclass
class Variant:
    """One model under test, its sparsity state and what its steps measured."""

    name: str
    description: str
    model: nn.Module
    state: SparsityState
    mlp: list[float]
    attn: list[float]
    timer: EstimatorTimer
    estimator_s: list[float] = field(default_factory=list)
    skipped_flops: float = 0.0


def build_variant(
    base: nn.Module, name: str, description: str, mlp: list[float], attn: list[float], rank: int, cache: Path
) -> Variant:
    """Wrap a shared-base copy; the SVD cache makes every variant reuse one set of factors."""
    model = share_frozen_copy(base)
    state = SparsityState(active=True)
    anatomy = describe(model)
    sparsify(model, anatomy.mlps + anatomy.attentions, mlp + attn, state, "svd", rank=rank, cache=cache)
    return Variant(name, description, model, state, mlp, attn, EstimatorTimer(model))


def train_step(variant: Variant, tokens: torch.Tensor, labels: torch.Tensor, context: torch.Tensor) -> Callable[[], float]:
    """One step: forward with causal-LM loss on ``labels``, backward, AdamW over the adapters."""
    model, state, timer = variant.model, variant.state, variant.timer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        state.reset()
        state.context_mask = context
        timer.seconds = 0.0
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        optimizer.step()
        variant.estimator_s.append(timer.seconds)
        variant.skipped_flops = state.skipped_flops
        return loss.item()

    return step


def _attention_flops(query: torch.Size, key: torch.Size, value: torch.Size, *_: Any, **__: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_backward_flops(
    grad_out: torch.Size, query: torch.Size, key: torch.Size, value: torch.Size, *_: Any, **__: Any
) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that SDPA runs
# here; without these (torch's formulas for the CUDA kernels) attention would count as free, and
# the ideal would expect the sparse variants to shrink attention work they do not touch.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def count_flops(step: Callable[[], float]) -> int:
    """FLOPs of one step as torch dispatches them (matmuls, SDPA), sliced kernels included."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        step()
    return counter.get_total_flops()


def top_ops(step: Callable[[], float], rows: int) -> list[dict[str, Any]]:
    """The ``rows`` ops with the most self CPU time in one step: where a sparse step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total, "calls": e.count}
        for e in events[:rows]
    ]


def benchmark(
    settings: SparsityBenchSettings,
    names: list[str],
    profile_rows: int = 0,
    svd_cache: str | None = None,
    family: str = "llama",
) -> dict[str, Any]:
    """Build, count FLOPs of, warm up and time every variant; returns JSON-serialisable results.
    ``svd_cache``: a directory that keeps the estimator factors across runs (a rerun skips their
    SVDs); None uses a temporary one."""
    import transformers

    started = time.perf_counter()
    base = build_base(settings, family)
    specs = _variants(settings.layers)
    cache_dir: contextlib.AbstractContextManager[str]
    if svd_cache is None:
        cache_dir = tempfile.TemporaryDirectory(prefix="lsft-bench-svd-")
    else:
        cache_dir = contextlib.nullcontext(svd_cache)
    with cache_dir as cache:
        variants = {
            name: build_variant(base, name, specs[name][0], specs[name][1], specs[name][2], settings.rank, Path(cache))
            for name in names
        }
    del base  # the variants hold the shared frozen weights
    generator = torch.Generator().manual_seed(settings.seed + 1)
    tokens = torch.randint(settings.vocab, (settings.batch, settings.seq), generator=generator)
    labels = tokens.clone()
    labels[:, : settings.seq - settings.output] = IGNORE_INDEX
    context = context_mask_from_labels(labels)
    steps = {name: train_step(v, tokens, labels, context) for name, v in variants.items()}
    flops = {name: count_flops(step) for name, step in steps.items()}
    profiles = {name: top_ops(step, profile_rows) for name, step in steps.items()} if profile_rows else {}
    for v in variants.values():
        v.estimator_s.clear()
    load_before = _load_average()
    times = interleaved(steps, steps=settings.steps, warmup=settings.warmup)
    load = [load_before, _load_average()]
    dense = summarize(times["dense"])
    tokens_per_step = settings.batch * settings.seq
    rows: dict[str, dict[str, Any]] = {}
    for name, v in variants.items():
        s = summarize(times[name])
        flop_ratio = flops[name] / flops["dense"]
        speedup = dense.median / s.median
        timed_estimator = v.estimator_s[-settings.steps :]
        rows[name] = {
            "description": v.description,
            "mlp_sparsity": v.mlp,
            "attn_sparsity": v.attn,
            "median_s": s.median,
            "q1_s": s.q1,
            "q3_s": s.q3,
            "iqr_s": s.iqr,
            "tokens_per_s": tokens_per_step / s.median,
            "flops": flops[name],
            "flop_ratio": flop_ratio,
            "analytic_flop_ratio": (flops["dense"] - v.skipped_flops) / flops["dense"],
            "speedup": speedup,
            "per_round_speedup": summarize(paired_ratios(times["dense"], times[name])).median,
            "fraction_of_ideal": speedup * flop_ratio,
            "estimator_share": summarize([e / t for e, t in zip(timed_estimator, times[name])]).median,
            "step_times_s": times[name],
            "estimator_times_s": timed_estimator,
        }
    return {
        "settings": dataclasses.asdict(settings),
        "family": family,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "context_tokens": int(context.sum()),
        "variants": rows,
        "headline": HEADLINE if HEADLINE in rows else None,
        "profiles": profiles,
        "load_average": load if None not in load else None,
        "wall_s": time.perf_counter() - started,
    }


def _load_average() -> float | None:
    """The machine's 1-minute load average, where the OS reports one: other jobs on a shared
    machine slow the steps they overlap, so the report shows how busy it was."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _layers(values: list[float]) -> str:
    return "/".join(f"{v:g}" for v in values)


def format_report(result: dict[str, Any]) -> str:
    s = result["settings"]
    threads = f"{result['threads']} thread" + ("s" if result["threads"] != 1 else "")
    lines = [
        f"Contextual-sparsity train step (fwd+bwd+AdamW), {result.get('family', 'llama')}: hidden {s['hidden']}, intermediate"
        f" {s['intermediate']}, {s['layers']} layers, {s['heads']}/{s['kv_heads']} heads, vocab {s['vocab']};"
        f" batch {s['batch']} x seq {s['seq']}, last {s['output']} scored; LoRA r {s['r']} all-linear; SVD rank"
        f" {s['rank']}; fp32, {threads}",
        f"torch {result['versions']['torch']}, transformers {result['versions']['transformers']};"
        f" {s['warmup']} warm-up + {s['steps']} timed rounds, variants alternating; {result['context_tokens']}"
        f" of {s['batch'] * s['seq']} tokens run sparse (context_mask_from_labels)",
        "FLOPs: FlopCounterMode on one step of each variant (sliced matmuls counted as run, attention"
        " included); 'analytic' = dense - state.skipped_flops",
    ]
    if result["load_average"]:
        before, after = result["load_average"]
        lines.append(f"machine load average (1 min) {before:.2f} before the timed rounds, {after:.2f} after")
    lines.append("")
    for name, v in result["variants"].items():
        lines.append(f"{name:<12} {v['description']}: MLP {_layers(v['mlp_sparsity'])}, attn {_layers(v['attn_sparsity'])}")
    lines += [
        "",
        f"{'variant':<12}{'median s':>9}{'IQR s':>8}{'tok/s':>8}{'GFLOP':>8}{'FLOP ratio':>11}{'analytic':>9}"
        f"{'speedup':>8}{'paired':>7}{'of ideal':>9}{'estimator':>10}",
    ]
    for name, v in result["variants"].items():
        lines.append(
            f"{name:<12}{v['median_s']:>9.3f}{v['iqr_s']:>8.3f}{v['tokens_per_s']:>8.1f}{v['flops'] / 1e9:>8.1f}"
            f"{v['flop_ratio']:>11.3f}{v['analytic_flop_ratio']:>9.3f}{v['speedup']:>7.2f}x{v['per_round_speedup']:>6.2f}x"
            f"{v['fraction_of_ideal']:>9.2f}{v['estimator_share']:>9.1%} "
        )
    for name, ops in result["profiles"].items():
        lines += ["", f"{name}: top ops by self CPU time (one profiled step)"]
        lines += [f"  {op['op']:<40}{op['self_ms']:>9.1f} ms{op['share']:>7.1%}{op['calls']:>7} calls" for op in ops]
    headline = result["headline"]
    if headline is not None:
        v = result["variants"][headline]
        sparse = [row for name, row in result["variants"].items() if name != "dense"]
        worst_estimator = max(row["estimator_share"] for row in sparse)
        lines += [
            "",
            f"targets, judged on {headline} (Math10K-like) unless noted:",
            f"  >= {SPEEDUP_TARGET}x faster at the Math10K-like setting: {v['speedup']:.2f}x"
            f" {_verdict(v['speedup'] >= SPEEDUP_TARGET)}",
            f"  >= {IDEAL_TARGET:.0%} of the FLOP-ratio ideal ({1 / v['flop_ratio']:.2f}x):"
            f" {v['fraction_of_ideal']:.0%} {_verdict(v['fraction_of_ideal'] >= IDEAL_TARGET)}",
            f"  estimator <= {ESTIMATOR_TARGET:.0%} of step time (worst sparse variant): {worst_estimator:.1%}"
            f" {_verdict(worst_estimator <= ESTIMATOR_TARGET)}",
        ]
    lines.append(f"wall time {result['wall_s']:.0f} s")
    return "\n".join(lines)
