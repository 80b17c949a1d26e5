"""The memory model: the bytes one training step holds on each device, component by component.

Pure arithmetic on a ``ModelShape`` and a ``TrainingSetup``. Activation terms are derived op by op
from the transformers implementations (LLaMA-style blocks: RMSNorm, gated MLP, rotary, GQA; GPT-2
style blocks: LayerNorm, GELU MLP, dropout) and checked against measured steps (docs/memory.md).

The peak is the largest of four moments of a Lightning step (automatic optimization):
- ``forward``: the end of the forward pass. Lightning zeroes gradients after the forward, so the
  previous step's gradients are still alive here, next to the activations and the logits.
- ``backward``: the start of backward, where cross-entropy's gradient is two fp32 logits-sized tensors.
- ``recompute``: with gradient checkpointing, one block recomputed during backward.
- ``optimizer``: gradients, optimizer state and the optimizer's own temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_sft.losses.linear_cross_entropy import default_chunk
from lightning_sft.memory.shapes import ModelShape, model_shape
from lightning_sft.validation import check_int

COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "temporaries")

Method = Literal["full", "lora", "qlora", "sft"]
Precision = Literal["32-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed"]
Attention = Literal["eager", "sdpa", "flash_attention_2"]
Optimizer = Literal["adamw", "adamw8bit", "sgd"]
Device = Literal["cuda", "cpu"]

METHODS = ("full", "lora", "qlora", "sft")
PRECISIONS = ("32-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed")
ATTENTIONS = ("eager", "sdpa", "flash_attention_2")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")

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
class TrainingSetup:
    """How a model is fine-tuned: method, per-device batch, precision and the memory recipes.

    ``batch`` is the micro-batch on each device. ``layer_dropout`` is the expected fraction of
    blocks skipped (activations shrink by it on average; a step that keeps every block is as large
    as without it). ``device`` matters only for details of the kernels: CPU dropout keeps a float
    mask where CUDA keeps a byte mask.
    """

    method: Method = "lora"
    batch: int = 1
    seq: int = 2048
    precision: Precision = "bf16-true"
    lora_r: int = 16
    sft_density: float = 0.01
    gradient_checkpointing: bool = False
    attention: Attention = "sdpa"
    optimizer: Optimizer = "adamw"
    zero_stage: int = 0
    gpus: int = 1
    layer_dropout: float = 0.0
    device: Device = "cuda"
    fused_ce: bool = False

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("attention", self.attention, ATTENTIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("device", self.device, ("cuda", "cpu"))
        for name in ("batch", "seq", "lora_r", "gpus"):
            check_int(getattr(self, name), name, 1, "Sizes and counts are positive integers.")
        if not 0 < self.sft_density <= 1:
            raise ValueError(f"sft_density must be in (0, 1]; got {self.sft_density!r}, e.g. 0.01 for 1%.")
        if not 0 <= self.layer_dropout < 1:
            raise ValueError(f"layer_dropout must be in [0, 1); got {self.layer_dropout!r}.")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0 (none), 1, 2 or 3 (FSDP FULL_SHARD); got {self.zero_stage!r}.")
        if self.zero_stage and self.gpus == 1:
            raise ValueError("zero_stage shards over several GPUs: set gpus > 1, or zero_stage=0 on one GPU.")
        if self.method == "qlora" and self.precision in ("32-true",):
            raise ValueError("QLoRA computes in 16-bit: use precision='bf16-true' (or '16-true').")

    @property
    def weight_bytes(self) -> int:
        """Bytes per weight element: mixed precision keeps fp32 weights (autocast computes in 16-bit)."""
        return 4 if self.precision in ("32-true", "bf16-mixed", "16-mixed") else 2

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision == "32-true" else 2

    def with_(self, **changes: Any) -> TrainingSetup:
        return TrainingSetup(**{**self.__dict__, **changes})


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-device bytes. ``sizes`` are the components' full sizes; ``at_peak`` what each holds at
    the peak moment (gradients are gone at the start of backward, activations in the optimizer
    step); ``temporaries`` only exist at a moment, so they appear in ``at_peak`` alone."""

    shape: ModelShape
    setup: TrainingSetup
    sizes: dict[str, int]
    at_peak: dict[str, int]
    phase: str
    phases: dict[str, int] = field(default_factory=dict)

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
    activations, block_activations = _activations(shape, setup)
    logits = 0 if setup.fused_ce else _logits(shape, setup)
    held, loss_forward, loss_backward = _fused_loss(shape, setup) if setup.fused_ce else (
        0, _forward_temporaries(shape, setup), 8 * setup.batch * setup.seq * shape.vocab + _batch_bytes(setup))
    activations += held
    sizes = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations, "logits": logits}

    gathered = 2 * _block_weight_bytes(shape, setup) if setup.zero_stage == 3 else 0  # one block in use, one prefetched
    tokens = setup.batch * setup.seq
    phases = {
        "forward": {**sizes, "temporaries": loss_forward + gathered},
        "backward": {**sizes, "gradients": 0, "temporaries": loss_backward + gathered},
        "optimizer": {
            "weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": 0, "logits": 0,
            "temporaries": _optimizer_temporaries(trainable, setup) + _batch_bytes(setup),
        },
    }
    if setup.gradient_checkpointing:
        hidden_grads = 2 * tokens * shape.hidden * setup.activation_bytes
        phases["recompute"] = {
            **sizes, "logits": 0, "gradients": _head_gradients(shape, setup),
            "temporaries": block_activations + hidden_grads + _batch_bytes(setup) + gathered,
        }
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    phase = max(totals, key=totals.__getitem__)
    return MemoryEstimate(shape, setup, sizes, phases[phase], phase, totals)


def _batch_bytes(setup: TrainingSetup) -> int:
    """The int64 token ids of the batch."""
    return 8 * setup.batch * setup.seq


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
        total += sum(_trainable_tensors(shape, setup)) * _adapter_bytes(setup)
    if setup.method == "sft":
        entries = sum(_trainable_tensors(shape, setup))
        total += entries * (8 + _adapter_bytes(setup))  # int64 positions and the trained values
    return total + _buffer_bytes(shape, setup)


def _buffer_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    """Rotary inverse frequencies (current and original) of LLaMA-style models: small, counted for exactness."""
    return 0 if not shape.rms_norm else 2 * (shape.head_dim // 2) * setup.weight_bytes


def _adapter_bytes(setup: TrainingSetup) -> int:
    """Adapters and sparse deltas train in fp32; Lightning's "-true" precisions convert them with the model."""
    return 4 if setup.precision in ("32-true", "bf16-mixed", "16-mixed") else 2


def _grad_bytes(setup: TrainingSetup) -> int:
    return _adapter_bytes(setup) if setup.method != "full" else setup.weight_bytes


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


# Activations ----------------------------------------------------------------------------------------


def _activations(shape: ModelShape, setup: TrainingSetup) -> tuple[int, int]:
    """(bytes the autograd graph holds between forward and backward outside the logits, bytes of one
    block's full activations: the recompute of a checkpointed block)."""
    tokens = setup.batch * setup.seq
    p = setup.activation_bytes
    trains_all = setup.method == "full"
    block = _block_bytes(shape, setup, first=False)
    first = _block_bytes(shape, setup, first=True)
    kept = 1 - setup.layer_dropout
    if setup.gradient_checkpointing:
        blocks = tokens * shape.hidden * p * shape.layers * kept  # each block's input, kept by its checkpoint
    else:
        blocks = (first + block * (shape.layers - 1)) * kept
    h = shape.hidden
    if shape.rms_norm:
        final_norm = tokens * (4 * h + 4 + (2 * p * h if trains_all else 0))
    else:
        final_norm = tokens * (p * h + 8 + (p * h if trains_all else 0))
    top = tokens * 8  # shifted labels (int64) kept by the loss; the token ids are the batch itself
    if shape.rms_norm:
        top += 2 * setup.seq * shape.head_dim * p  # rotary cos and sin, shared by all blocks
    else:
        top += tokens * h * _dropout_mask_bytes(setup) + setup.seq * 8 if trains_all else 0  # embedding dropout, positions
    return round(blocks + final_norm + top), round(block)


def _dropout_mask_bytes(setup: TrainingSetup) -> int:
    return setup.activation_bytes if setup.device == "cpu" else 1


def _block_bytes(shape: ModelShape, setup: TrainingSetup, first: bool) -> float:
    """Bytes one block keeps for backward. ``first``: the first block, whose input needs no
    gradient unless the embedding trains (so its first norm keeps only its output)."""
    tokens = setup.batch * setup.seq
    p = setup.activation_bytes
    h, q, kv, f = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    trains_all = setup.method == "full"
    if shape.rms_norm:
        # input upcast to fp32 (or the fp32 input itself) + the fp32 rstd; the normalized input and
        # the output, each in the compute dtype; with a frozen norm weight only the output.
        norm = 4 * h + 4 + (2 * p * h if trains_all else p * h)
        first_norm = norm if trains_all or not first else p * h
        if setup.attention == "eager":
            # contiguous q, keys and values repeated to all heads, fp32 softmax (+ its 16-bit copy), o_proj input
            attention = 4 * p * q + shape.heads * setup.seq * (4 + (2 if p == 2 else 0))
        else:
            attention = p * (2 * q + 2 * kv) + 4 * shape.heads  # q, k, v, output (o_proj's input), logsumexp
        mlp = 4 * p * f if shape.gated_mlp else 5 * p * f
        per_token = first_norm + norm + attention + mlp
    else:
        mask = _dropout_mask_bytes(setup)
        # LayerNorm keeps input, output, mean and rstd (fp32); the first keeps only its output when
        # the embedding is frozen. Residual dropout after attention and MLP keeps two masks.
        norm = 2 * p * h + 8
        first_norm = norm if trains_all or not first else p * h
        probs = shape.heads * setup.seq * (2 * p + mask)  # softmax, dropout mask, dropped probabilities
        attention = 4 * p * q + probs  # q, k, v and the output projection's input
        mlp = 5 * p * f  # gelu_new keeps its input, the cube path, tanh and both products
        per_token = first_norm + norm + attention + mlp + 2 * mask * h
    if setup.method in ("lora", "qlora"):
        per_token += len(shape.linear_shapes()) * setup.lora_r * _adapter_bytes(setup)
    return tokens * per_token


def _logits(shape: ModelShape, setup: TrainingSetup) -> int:
    """Cross-entropy keeps its fp32 log-softmax: 4 bytes per token per vocabulary entry."""
    return 4 * setup.batch * setup.seq * shape.vocab


def _fused_loss(shape: ModelShape, setup: TrainingSetup) -> tuple[int, int, int]:
    """(held from the loss to backward, forward temporaries, backward temporaries) of the fused linear
    cross-entropy (``losses.linear_cross_entropy``). Its forward computes the gradients and holds them: the
    hidden states' in their dtype, and the head weight's in fp32 when the head trains. At work it holds one
    chunk's fp32 logits and logsumexp's fp32 working copy of them, and with 16-bit weights two more chunks
    in that dtype (the logits as computed, and the gradient cast back for its products; measured). Backward scales the held gradients once;
    with no logits gradient left, its largest working set is the last block's MLP gradients (of the down
    projection's input and, gated, of the gate and up outputs). No ``tokens x vocab`` tensor exists."""
    tokens = setup.batch * setup.seq
    chunk = min(tokens, default_chunk(tokens, shape.vocab, shape.hidden))
    held = tokens * shape.hidden * setup.activation_bytes + (4 * shape.vocab * shape.hidden if setup.method == "full" else 0)
    labels = _batch_bytes(setup) + tokens * 8  # the batch's ids and the labels shifted for the loss
    if setup.method == "full" and setup.activation_bytes != 4:  # a 16-bit head's chunk gradient before fp32
        labels += shape.vocab * shape.hidden * setup.activation_bytes
    mlp_grads = (3 if shape.gated_mlp else 2) * tokens * shape.intermediate * setup.activation_bytes
    per_entry = 8 + (2 * setup.activation_bytes if setup.activation_bytes != 4 else 0)
    return held, per_entry * chunk * shape.vocab + labels, held + labels + mlp_grads


def _forward_temporaries(shape: ModelShape, setup: TrainingSetup) -> int:
    """At the end of the forward pass: the logits in the compute dtype, their fp32 copy for the loss
    (16-bit only), the labels padded for the shift, and the key/value cache of eager attention."""
    tokens = setup.batch * setup.seq
    p = setup.activation_bytes
    logits = tokens * shape.vocab * (p + (4 if p != 4 else 0))
    # transformers returns a key/value cache (use_cache defaults to True). Fused attention saves those
    # very tensors for backward; LLaMA-style eager attention saves copies repeated to every head, so
    # the cached originals are extra until the step drops the model's output.
    cache = 2 * shape.layers * tokens * shape.kv_width * p if setup.attention == "eager" and shape.rms_norm else 0
    return logits + cache + _batch_bytes(setup) + tokens * 8
