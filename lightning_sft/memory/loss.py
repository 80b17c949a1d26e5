"""The memory of the loss: cross-entropy's logits, and what the fused linear cross-entropy holds instead.

Pure arithmetic on a ``ModelShape`` and a ``TrainingSetup``, read by ``estimate``.
"""

from __future__ import annotations

from lightning_sft.losses.linear_cross_entropy import default_chunk
from lightning_sft.memory.activations import mlp_gradients
from lightning_sft.memory.setup import TrainingSetup
from lightning_sft.memory.shapes import ModelShape


def batch_bytes(setup: TrainingSetup) -> int:
    """The int64 token ids of the batch."""
    return 8 * setup.tokens


def logits(shape: ModelShape, setup: TrainingSetup) -> int:
    """Cross-entropy keeps its fp32 log-softmax: 4 bytes per token per vocabulary entry."""
    return 4 * setup.tokens * shape.vocab


def unfused_backward(shape: ModelShape, setup: TrainingSetup) -> int:
    """At the start of backward: cross-entropy's gradient, two fp32 logits-sized tensors, and the batch."""
    return 8 * setup.tokens * shape.vocab + batch_bytes(setup)


def fused_loss(shape: ModelShape, setup: TrainingSetup) -> tuple[int, int, int]:
    """(held from the loss to backward, forward temporaries, backward temporaries) of the fused linear
    cross-entropy (``losses.linear_cross_entropy``). Its forward computes the gradients and holds them: the
    hidden states' in their dtype, and the head weight's in fp32 when the head trains. At work it holds one
    chunk's fp32 logits and logsumexp's fp32 working copy of them, and with 16-bit weights two more chunks
    in that dtype (the logits as computed, and the gradient cast back for its products; measured). Backward
    scales the held gradients once; with no logits gradient left, its largest working set is the last block's
    MLP gradients (of the down projection's input and, gated, of the gate and up outputs). No
    ``tokens x vocab`` tensor exists."""
    tokens = setup.tokens
    chunk = min(tokens, default_chunk(tokens, shape.vocab, shape.hidden))
    held = tokens * shape.hidden * setup.activation_bytes + (4 * shape.vocab * shape.hidden if setup.method == "full" else 0)
    labels = batch_bytes(setup) + tokens * 8  # the batch's ids and the labels shifted for the loss
    if setup.method == "full" and setup.activation_bytes != 4:  # a 16-bit head's chunk gradient before fp32
        labels += shape.vocab * shape.hidden * setup.activation_bytes
    per_entry = 8 + (2 * setup.activation_bytes if setup.activation_bytes != 4 else 0)
    return held, per_entry * chunk * shape.vocab + labels, held + labels + mlp_gradients(shape, setup)


def forward_temporaries(shape: ModelShape, setup: TrainingSetup) -> int:
    """At the end of the forward pass: the logits in the compute dtype, their fp32 copy for the loss
    (16-bit only), the labels padded for the shift, and the key/value cache where it is not what backward
    saves (eager attention's, and any once offloading has copied those to the host). A checkpointed
    training forward has no cache."""
    tokens = setup.tokens
    p = setup.activation_bytes
    compute_logits = tokens * shape.vocab * (p + (4 if p != 4 else 0))
    # transformers returns a key/value cache (use_cache defaults to True). Fused attention saves those
    # very tensors for backward; LLaMA-style eager attention saves copies repeated to every head, so
    # the cached originals are extra until the step drops the model's output.
    extra_cache = (setup.attention == "eager" or setup.offload_activations) and not setup.gradient_checkpointing
    cache = 2 * shape.layers * tokens * shape.kv_width * p if extra_cache and shape.rms_norm else 0
    return compute_logits + cache + batch_bytes(setup) + tokens * 8
