"""Choosing a fine-tuning recipe for a model, a GPU budget and a batch: the recipes that fit, their
memory and relative speed, and one recommendation.

Relative speed is a FLOP model, not a measurement: a step costs its forward (2 FLOPs per weight per
token, plus attention), the input-gradient backward (the same again), the weight-gradient backward
(the same again, for full and sparse fine-tuning: sparse FT gathers its entries from the dense weight
gradient), and one more forward with gradient checkpointing. QLoRA's
dequantization and ZeRO's communication are not FLOPs: they enter as the assumed overheads below,
stated in every plan. Activation offloading's copies overlap the pass they belong to (out in the
forward, back in backward); only the time a pass's copies take beyond its compute is added, at the
assumed GPU speed and host-link bandwidth below. Its host memory is reported, and checked against
``host_memory`` when given.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from lightning_sft.memory.estimate import MemoryEstimate, estimate
from lightning_sft.memory.setup import TrainingSetup
from lightning_sft.memory.shapes import ModelShape, model_shape

GIB = 2**30
# Assumed, not measured here (no GPU): dequantizing NF4 weights in every forward and backward, and
# ZeRO-3's parameter all-gathers, each slow a step by this fraction.
QLORA_OVERHEAD = 0.3
ZERO3_OVERHEAD = 0.15
# Assumed, not measured here: offloading's hooks and stream synchronisation slow a step by this fraction even
# when its copies overlap compute (torchtune reports under 1% with activation checkpointing).
OFFLOAD_OVERHEAD = 0.01
# Assumed, not measured here: an H100-class GPU computing at 400 TFLOP/s (40% of its dense bf16 peak), and
# 20 GB/s each way between pinned host memory and the GPU (PCIe 4.0 x16 in practice).
GPU_FLOPS = 400e12
HOST_LINK_BYTES_PER_S = 20e9
# CUDA context and allocator slack that the tensors' peak does not include.
RESERVED_BYTES = GIB
PLAN_METHODS = ("full", "lora", "qlora", "sft")
# The strategy each ZeRO stage runs as under ``lightning-sft fit``: FSDP2 shards parameters, gradients and
# optimizer states as ZeRO-3 does, and every callback runs under it; ZeRO-2 is DeepSpeed's (CUDA, `deepspeed`).
SHARDED_STRATEGY_FLAGS = {2: "deepspeed_stage_2", 3: "fsdp2"}


@dataclass(frozen=True)
class Recipe:
    """One way to fine-tune: the estimate, its speed relative to the fastest recipe that fits, and
    whether it fits the budget."""

    estimate: MemoryEstimate
    speed: float
    fits: bool

    @property
    def setup(self) -> TrainingSetup:
        return self.estimate.setup

    def name(self) -> str:
        s = self.setup
        parts = [{"full": "full FT", "lora": "LoRA", "qlora": "QLoRA (NF4)", "sft": "sparse FT"}[s.method]]
        parts += ["checkpointing"] if s.gradient_checkpointing else []
        parts += ["8-bit AdamW"] if s.optimizer == "adamw8bit" else []
        parts += ["fused CE"] if s.fused_ce else []
        parts += ["offloading"] if s.offload_activations else []
        parts += [f"{'FSDP2 (ZeRO-3)' if s.zero_stage == 3 else f'ZeRO-{s.zero_stage}'} x{s.gpus}"] if s.zero_stage else []
        return " + ".join(parts)

    def flags(self) -> str:
        """How to switch the recipe on with ``lightning-sft fit``."""
        s = self.setup
        flags = [f"--trainer.precision {s.precision}"]
        if s.method == "full":
            flags.append("--no_lora")
        elif s.method == "sft":
            flags.append(f"--sft-density {s.sft_density:g}")
        else:
            flags.append(f"--lora.r {s.lora_r}")
            if s.method == "qlora":
                flags.append("--lora.quantize nf4")
        if s.gradient_checkpointing:
            flags.append("--gradient-checkpointing on")
        if s.optimizer == "adamw8bit":
            flags.append("--optimizer-8bit on")
        if s.fused_ce:
            flags.append("--fused-ce on")
        if s.offload_activations:
            flags.append("--offload-activations on")
        if s.attention != "eager":
            flags.append(f"--attention {s.attention}")
        flags.append("--trainer.accelerator gpu")
        if s.zero_stage:
            flags.append(f"--trainer.strategy {SHARDED_STRATEGY_FLAGS[s.zero_stage]}")
        if s.gpus > 1:
            flags.append(f"--trainer.devices {s.gpus}")
        return " ".join(flags)


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    budget: int
    recipes: list[Recipe]
    recommended: Recipe
    host_budget: int | None = None


class NothingFits(ValueError):
    """No recipe fits the budget; the message says what would."""


def forward_flops(shape: ModelShape, setup: TrainingSetup) -> float:
    """FLOPs of one forward pass per device: the linear layers and the head, and attention."""
    tokens = setup.batch * setup.seq
    linear = 2.0 * tokens * (shape.block_linear_params() * shape.layers + shape.vocab * shape.hidden)
    attention = 4.0 * tokens * setup.seq * shape.q_width * shape.layers  # QK^T and PV, causal halves ignored
    return linear + attention


def step_flops(shape: ModelShape, setup: TrainingSetup) -> float:
    """FLOPs of one training step per device (see the module docstring)."""
    # input gradients, and the dense weight gradients for full FT and sparse FT (which gathers them)
    passes = 2.0 if setup.method in ("full", "sft") else 1.0
    if setup.gradient_checkpointing:
        passes += 1.0
    return forward_flops(shape, setup) * (1.0 + passes)


def step_seconds(shape: ModelShape, estimate: MemoryEstimate) -> float:
    """Seconds of one training step at the assumed GPU speed, offloading's exposed copies included."""
    setup = estimate.setup
    flops = step_flops(shape, setup)
    if setup.method == "qlora":
        flops *= 1 + QLORA_OVERHEAD
    if setup.zero_stage == 3:
        flops *= 1 + ZERO3_OVERHEAD
    seconds = flops / GPU_FLOPS
    if not setup.offload_activations:
        return seconds
    # The copies out overlap the forward pass, the copies back the backward pass: only their excess shows.
    forward = forward_flops(shape, setup) / GPU_FLOPS
    copies = estimate.offloaded / HOST_LINK_BYTES_PER_S
    exposed = max(0.0, copies - forward) + max(0.0, copies - (seconds - forward))
    return seconds * (1 + OFFLOAD_OVERHEAD) + exposed


def candidate_setups(
    gpus: int, seq: int, batch: int, methods: tuple[str, ...] = PLAN_METHODS, lora_r: int = 16,
    sharded_only: bool = False,
) -> list[TrainingSetup]:
    """Every combination the planner weighs and ``lightning-sft fit`` runs: method x checkpointing x
    optimizer x fused cross-entropy x activation offloading, in bf16 with fused attention (the
    memory-cheapest precision and kernel); with several GPUs, DDP and ZeRO-3 (FSDP2) for every method, and
    ZeRO-2 (DeepSpeed) for full fine-tuning, where gradients are as large as the weights (ZeRO-1 is ZeRO-2
    with more memory and no gain in speed). 8-bit optimizer states, the fused loss and offloading go with
    DDP only (``EightBitOptimizer``, ``FusedCrossEntropy`` and ``ActivationOffloading`` refuse sharded
    strategies)."""
    setups = []
    for method, checkpointing, optimizer, fused, offload in itertools.product(
        methods, (False, True), ("adamw", "adamw8bit"), (False, True), (False, True)
    ):
        stages: tuple[int, ...] = (0,)
        if gpus > 1 and optimizer == "adamw" and not fused and not offload:
            stages = (0, 2, 3) if method == "full" else (0, 3)
        if sharded_only:
            stages = tuple(stage for stage in stages if stage)
        setups.extend(
            TrainingSetup(
                method=method, batch=batch, seq=seq, precision="bf16-true", lora_r=lora_r,
                gradient_checkpointing=checkpointing, attention="sdpa", optimizer=optimizer,
                zero_stage=stage, gpus=gpus, fused_ce=fused, offload_activations=offload,
            )
            for stage in stages
        )
    return setups


def plan(
    config: Any,
    gpu_memory: int,
    gpus: int = 1,
    seq: int = 2048,
    batch: int = 4,
    methods: tuple[str, ...] = PLAN_METHODS,
    lora_r: int = 16,
    sharded_only: bool = False,
    host_memory: int | None = None,
) -> Plan:
    """The recipes for ``config`` on ``gpus`` GPUs of ``gpu_memory`` bytes each, fastest first, and the
    recommendation: the fastest that fits (ties: the smaller peak); ``sharded_only`` weighs the ZeRO /
    FSDP2 recipes alone; ``host_memory`` (bytes per GPU's process), when given, bounds what offloaded
    activations may take. Raises ``NothingFits`` (saying which smaller batch, shorter sequence or more
    GPUs would fit) when none does."""
    if sharded_only and gpus < 2:
        raise ValueError("sharded recipes split the model over several GPUs: pass gpus >= 2.")
    if isinstance(gpu_memory, bool) or not isinstance(gpu_memory, int) or gpu_memory <= RESERVED_BYTES:
        raise ValueError(f"gpu_memory must be more than the {RESERVED_BYTES / GIB:.0f} GiB kept for the CUDA context; got {gpu_memory!r} bytes.")
    if host_memory is not None and (isinstance(host_memory, bool) or not isinstance(host_memory, int) or host_memory <= 0):
        raise ValueError(f"host_memory must be a positive number of bytes, or None to leave it unchecked; got {host_memory!r}.")
    unknown = [m for m in methods if m not in PLAN_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be among {', '.join(PLAN_METHODS)}; got {', '.join(methods) or 'none'}.")
    shape = config if isinstance(config, ModelShape) else model_shape(config)
    estimates = [estimate(shape, setup) for setup in candidate_setups(gpus, seq, batch, methods, lora_r, sharded_only)]
    fitting = [e for e in estimates if _fits(e, gpu_memory, host_memory)]
    if not fitting:
        smallest = min(estimates, key=lambda e: e.peak)
        raise NothingFits(_what_would_fit(shape, gpu_memory, gpus, seq, batch, methods, lora_r, smallest, host_memory))
    fastest = min(step_seconds(shape, e) for e in fitting)
    recipes = sorted(
        (Recipe(e, fastest / step_seconds(shape, e), _fits(e, gpu_memory, host_memory)) for e in estimates),
        key=lambda r: (not r.fits, -r.speed, r.estimate.peak),
    )
    return Plan(shape, gpu_memory, recipes, recipes[0], host_memory)


def _fits(e: MemoryEstimate, gpu_memory: int, host_memory: int | None) -> bool:
    return e.peak <= gpu_memory - RESERVED_BYTES and (host_memory is None or e.host <= host_memory)


def _what_would_fit(
    shape: ModelShape, gpu_memory: int, gpus: int, seq: int, batch: int, methods: tuple[str, ...], lora_r: int,
    smallest: MemoryEstimate, host_memory: int | None,
) -> str:
    message = (
        f"No recipe fits {gpu_memory / GIB:.1f} GiB per GPU ({gpus} GPU(s), seq {seq}, batch {batch}): the smallest,"
        f" {Recipe(smallest, 1.0, False).name()}, peaks at {smallest.peak / GIB:.2f} GiB"
        f" (+{RESERVED_BYTES / GIB:.0f} GiB CUDA context)"
        + (f" and needs {smallest.host / GIB:.2f} GiB of host memory." if smallest.host else ".")
    )

    def fits_any(gpus: int, seq: int, batch: int) -> bool:
        setups = candidate_setups(gpus, seq, batch, methods, lora_r)
        return any(_fits(estimate(shape, s), gpu_memory, host_memory) for s in setups)

    options = []
    for b in (batch // 2, batch // 4, 1):
        if 1 <= b < batch and fits_any(gpus, seq, b):
            options.append(f"--batch {b}")
            break
    for s in (seq // 2, seq // 4, seq // 8):
        if 1 <= s < seq and fits_any(gpus, s, batch):
            options.append(f"--seq {s}")
            break
    for n in (2, 4, 8, 16, 32, 64):
        if n > gpus and fits_any(n, seq, batch):
            options.append(f"--gpus {n} (ZeRO)")
            break
    if not options:
        for n, b, s in itertools.product((gpus, 2, 4, 8, 16, 32, 64), (batch, batch // 2, 1), (seq, seq // 2, seq // 4)):
            if n >= gpus and b >= 1 and s >= 1 and fits_any(n, s, b):
                options.append(f"--gpus {n} --batch {b} --seq {s}")
                break
    if options:
        return f"{message} It would fit with {' or '.join(options)}."
    return f"{message} Nothing fits with up to 64 GPUs, batch 1 and seq {max(seq // 4, 1)}: use larger GPUs."
