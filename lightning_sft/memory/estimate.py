"""The memory model: the bytes one training step holds on each device, component by component.

Pure arithmetic on a ``ModelShape`` and a ``TrainingSetup``: weights, gradients and optimizer state here,
activations in :mod:`~lightning_sft.memory.activations`, the loss in :mod:`~lightning_sft.memory.loss`; all
checked against measured steps (docs/memory.md).

The peak is the largest of these moments of a Lightning step (automatic optimization):
- ``forward``: the end of the forward pass. Lightning zeroes gradients after the forward, so the
  previous step's gradients are still alive here, next to the activations and the logits.
- ``backward``: the start of backward, where cross-entropy's gradient is two fp32 logits-sized tensors.
- ``recompute``: with gradient checkpointing, one block recomputed during backward.
- ``fetch``: with activation offloading (no checkpointing), the last block's backward, its activations
  back on the device and the block before it on the way.
- ``optimizer``: gradients, optimizer state and the optimizer's own temporaries.

Offloaded activations are not device memory; ``MemoryEstimate.host`` is the host memory they take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lightning_sft.memory.activations import activations as activation_bytes, mlp_gradients
from lightning_sft.memory.loss import batch_bytes, forward_temporaries, fused_loss, logits as logits_bytes, unfused_backward
from lightning_sft.memory.setup import TrainingSetup
from lightning_sft.memory.shapes import ModelShape, model_shape

COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "temporaries")

# bitsandbytes: tensors under this many elements keep 32-bit optimizer state; 8-bit state is
# quantized in blocks of 256 with one fp32 absmax each, plus a 256-entry fp32 code per state.
MIN_8BIT_SIZE = 4096
_BNB_BLOCK = 256
# NF4 (QLoRA): 4 bits per weight, one absmax per 64 weights, itself quantized to 8 bits in blocks
# of 256 with an fp32 scale (double quantization), plus the 16-entry code.
NF4_BLOCK = 64
_NF4_ABSMAX_BLOCK = 256
FINGERPRINT_SAMPLES = 4096


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-device bytes. ``sizes`` are the components' full sizes; ``at_peak`` what each holds at
    the peak moment (gradients are gone at the start of backward, activations in the optimizer
    step); ``temporaries`` only exist at a moment, so they appear in ``at_peak`` alone. ``host``: the
    host memory offloaded activations take, ``offloaded``: the bytes they are (each way, per step)."""

    shape: ModelShape
    setup: TrainingSetup
    sizes: dict[str, int]
    at_peak: dict[str, int]
    phase: str
    phases: dict[str, int] = field(default_factory=dict)
    host: int = 0
    offloaded: int = 0

    @property
    def peak(self) -> int:
        return sum(self.at_peak.values())

    @property
    def trainable_params(self) -> int:
        return sum(_trainable_tensors(self.shape, self.setup))


def estimate(config: Any, setup: TrainingSetup | None = None, **options: Any) -> MemoryEstimate:
    """The memory of one training step of ``config`` (a preset name, config.json path, dict or
    ``PretrainedConfig``, or a ``ModelShape``) under ``setup`` (or ``TrainingSetup(**options)``)."""
    if setup is None:
        setup = TrainingSetup(**options)
    elif options:
        setup = setup.with_(**options)
    shape = config if isinstance(config, ModelShape) else model_shape(config)
    trainable = _trainable_tensors(shape, setup)
    n = setup.gpus if setup.zero_stage else 1
    weights = _weights(shape, setup)
    if setup.zero_stage == 3:
        weights = _sharded(weights, n)
    gradients = sum(trainable) * _grad_bytes(setup)
    if setup.zero_stage >= 2:
        gradients = _sharded(gradients, n)
    elif setup.gpus > 1 and not setup.zero_stage:
        gradients *= 2  # DDP's gradient buckets: a second copy unless gradient_as_bucket_view=True
    optimizer = _optimizer(trainable, setup)
    if setup.zero_stage >= 1:
        optimizer = _sharded(optimizer, n)
    acts = activation_bytes(shape, setup)
    logits = 0 if setup.fused_ce else logits_bytes(shape, setup)
    held, loss_forward, loss_backward = fused_loss(shape, setup) if setup.fused_ce else (
        0, forward_temporaries(shape, setup), unfused_backward(shape, setup))
    sizes = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": acts.held + held,
             "logits": logits}

    gathered = 2 * _block_weight_bytes(shape, setup) if setup.zero_stage == 3 else 0  # one block in use, one prefetched
    # Offloading: the last block's copies may still be on their way out when the forward pass ends (CUDA's are
    # asynchronous), and in backward a block's activations come back with the one before it on the way.
    in_flight = acts.moved if setup.offload_activations and setup.device == "cuda" else 0
    fetched = 2 * acts.moved
    phases = {
        "forward": {**sizes, "temporaries": loss_forward + gathered + in_flight},
        "backward": {**sizes, "gradients": 0, "temporaries": loss_backward + gathered},
        "optimizer": {
            "weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": 0, "logits": 0,
            "temporaries": _optimizer_temporaries(trainable, setup) + batch_bytes(setup),
        },
    }
    hidden_grads = 2 * setup.tokens * shape.hidden * setup.activation_bytes
    during_blocks = {**sizes, "logits": 0, "gradients": _head_gradients(shape, setup)}
    if setup.gradient_checkpointing:
        phases["recompute"] = {
            **during_blocks, "temporaries": acts.block + fetched + hidden_grads + batch_bytes(setup) + gathered,
        }
    elif setup.offload_activations:
        phases["fetch"] = {
            **during_blocks, "temporaries": fetched + mlp_gradients(shape, setup) + batch_bytes(setup) + gathered,
        }
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    phase = max(totals, key=totals.__getitem__)
    return MemoryEstimate(shape, setup, sizes, phases[phase], phase, totals, acts.host, acts.offloaded)


def _sharded(nbytes: int, n: int) -> int:
    return math.ceil(nbytes / n)


# Weights, gradients, optimizer state ----------------------------------------------------------------


def _adapted_linears(shape: ModelShape) -> list[tuple[int, int]]:
    """(in, out) of every linear layer LoRA / QLoRA / sparse deltas target ("all-linear": the blocks'
    projections, not the output head)."""
    return shape.linear_shapes() * shape.layers


def _trainable_tensors(shape: ModelShape, setup: TrainingSetup) -> list[int]:
    """Element counts of the trainable tensors (one optimizer state entry each)."""
    if setup.method == "full":
        per_block = [i * o for i, o in shape.linear_shapes()] + _block_small_tensors(shape)
        top = [shape.vocab * shape.hidden] + ([shape.learned_positions * shape.hidden] if shape.learned_positions else [])
        top += [] if shape.tied_embeddings else [shape.vocab * shape.hidden]
        top += [shape.hidden] * (1 if shape.rms_norm else 2)
        return per_block * shape.layers + top
    if setup.method == "sft":
        return [min(i * o, max(1, round(setup.sft_density * i * o))) for i, o in _adapted_linears(shape)]
    r = setup.lora_r
    return [t for i, o in _adapted_linears(shape) for t in (r * i, o * r)]


def _block_small_tensors(shape: ModelShape) -> list[int]:
    """Norm weights/biases and linear biases of one block, tensor by tensor."""
    h = shape.hidden
    norms = [h] * (2 if shape.rms_norm else 4)
    if shape.family == "gpt2":
        return norms + [shape.q_width + 2 * shape.kv_width, h, shape.intermediate, h]
    biases = [shape.q_width, shape.kv_width, shape.kv_width] if shape.qkv_bias else []
    if shape.mlp_bias:
        biases += [shape.intermediate] * (2 if shape.gated_mlp else 1) + [h]
    return norms + biases


def _nf4_bytes(numel: int) -> int:
    """Packed 4-bit weights plus double-quantized absmax (uint8 per 64, fp32 per 256 absmax)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / _NF4_ABSMAX_BLOCK) + _NF4_STATE_BYTES


_NF4_STATE_BYTES = 16 * 4 + 256 * 4 + 4  # per layer: NF4 code, absmax code, absmax offset


def _weights(shape: ModelShape, setup: TrainingSetup) -> int:
    p = setup.weight_bytes
    total = shape.num_params() * p
    linears = _adapted_linears(shape)
    if setup.method == "qlora":
        total -= sum(i * o for i, o in linears) * p
        total += sum(_nf4_bytes(i * o) for i, o in linears)
        # each quantized layer keeps a strided sample of its original weight, so adapters saved from
        # it still name the unquantized base they belong on (lightning_sft.fingerprint)
        total += sum(min(i * o, FINGERPRINT_SAMPLES) for i, o in linears) * p
    if setup.method in ("lora", "qlora"):
        total += sum(_trainable_tensors(shape, setup)) * setup.adapter_bytes
    if setup.method == "sft":
        entries = sum(_trainable_tensors(shape, setup))
        total += entries * (8 + setup.adapter_bytes)  # int64 positions and the trained values
    return total + _buffer_bytes(shape, setup)


def _buffer_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    """Rotary inverse frequencies (current and original) of LLaMA-style models: small, counted for exactness."""
    return 0 if not shape.rms_norm else 2 * (shape.head_dim // 2) * setup.weight_bytes


def _grad_bytes(setup: TrainingSetup) -> int:
    return setup.adapter_bytes if setup.method != "full" else setup.weight_bytes


def _optimizer(trainable: list[int], setup: TrainingSetup) -> int:
    p = _grad_bytes(setup)
    if setup.optimizer == "sgd":
        return sum(trainable) * p  # momentum buffer
    if setup.optimizer == "adamw":
        return 2 * p * sum(trainable) + 4 * len(trainable)  # two moments, and a 4-byte step tensor each
    # bitsandbytes: 8-bit moments with an fp32 absmax per block; fp32 moments for small tensors; the
    # two 256-entry quantization maps are shared by all tensors; the step is a Python int.
    large = [n for n in trainable if n >= MIN_8BIT_SIZE]
    small = sum(n for n in trainable if n < MIN_8BIT_SIZE)
    maps = 2 * _BNB_BLOCK * 4 if large else 0
    return sum(2 * n + 2 * 4 * math.ceil(n / _BNB_BLOCK) for n in large) + 8 * small + maps


def _optimizer_temporaries(trainable: list[int], setup: TrainingSetup) -> int:
    """The optimizer updates one tensor at a time on CPU/single-tensor paths: two temporaries of the
    largest trainable tensor (AdamW's denominator and update)."""
    largest = max(trainable, default=0)
    return 2 * largest * (4 if setup.optimizer == "adamw8bit" else _grad_bytes(setup))


def _head_gradients(shape: ModelShape, setup: TrainingSetup) -> int:
    """Gradients already computed when backward reaches the last block: the output head's."""
    if setup.method != "full":
        return 0
    return (shape.vocab * shape.hidden + shape.hidden) * setup.weight_bytes


def _block_weight_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    return (shape.block_linear_params() + shape.block_other_params()) * setup.weight_bytes


