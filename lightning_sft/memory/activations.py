"""The memory of activations: what each block saves for backward, tensor by tensor, and where it waits.

Pure arithmetic on a ``ModelShape`` and a ``TrainingSetup``, read by ``estimate``. The terms are derived op by
op from the transformers implementations (LLaMA-style blocks: RMSNorm, gated MLP, rotary, GQA; GPT-2 style
blocks: LayerNorm, GELU MLP, dropout) and checked against measured steps (docs/memory.md). Listing each saved
tensor, not a per-block total, is what lets activation offloading's ``min_bytes`` rule pick those that move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_sft.memory.setup import TrainingSetup
from lightning_sft.memory.shapes import ModelShape


@dataclass(frozen=True)
class Activations:
    """Bytes of activations between the forward and the backward pass, outside the logits.

    ``held``: on the device. ``block``: one block's full activations (what a checkpointed block's recompute
    holds). ``offloaded``: copied to the host in the forward pass and back in backward; ``host``: the host
    memory that takes. ``moved``: what one block offloads, which comes back in its backward (with the block
    before it on the way).
    """

    held: int
    block: int
    offloaded: int = 0
    host: int = 0
    moved: int = 0


def activations(shape: ModelShape, setup: TrainingSetup) -> Activations:
    """Where the activations of one training step of ``shape`` under ``setup`` wait for backward."""
    tokens, p = setup.tokens, setup.activation_bytes
    trains_all = setup.method == "full"
    kept = 1 - setup.layer_dropout
    full = _block_tensors(shape, setup, first=False)
    if setup.gradient_checkpointing:  # each block's input, kept by its checkpoint
        first = block = [float(shape.hidden * p)]
    else:
        first, block = _block_tensors(shape, setup, first=True), full
    h = shape.hidden
    if shape.rms_norm:
        final_norm = tokens * (4 * h + 4 + (2 * p * h if trains_all else 0))
    else:
        final_norm = tokens * (p * h + 8 + (p * h if trains_all else 0))
    top = tokens * 8  # shifted labels (int64) kept by the loss; the token ids are the batch itself
    shared: list[float] = []  # saved inside the blocks, computed once for all of them
    if shape.rms_norm and not setup.gradient_checkpointing:
        shared = [setup.seq * shape.head_dim * p] * 2  # rotary cos and sin
    elif shape.rms_norm:
        top += 2 * setup.seq * shape.head_dim * p  # computed outside the checkpoints, kept by them
    elif trains_all:
        top += tokens * h * _dropout_mask_bytes(setup) + setup.seq * 8  # embedding dropout, positions
    full_block = round(tokens * sum(full))
    all_blocks = tokens * (sum(first) + sum(block) * (shape.layers - 1)) * kept + sum(shared)
    if not setup.offload_activations:
        return Activations(round(all_blocks + final_norm + top), full_block)
    sizes = [[tokens * t for t in first]] + [[tokens * t for t in block]] * (shape.layers - 1)
    moved = [[size for size in tensors if size >= setup.offload_min_bytes] for tensors in sizes]
    moved_shared = [size for size in shared if size >= setup.offload_min_bytes]
    on_host = sum(_host_bytes(setup, size) for tensors in moved for size in tensors) * kept
    on_host += sum(_host_bytes(setup, size) for size in moved_shared)
    offloaded = sum(map(sum, moved)) * kept + sum(moved_shared)
    return Activations(round(all_blocks - offloaded + final_norm + top), full_block, round(offloaded), round(on_host),
                       round(sum(moved[-1])))


def mlp_gradients(shape: ModelShape, setup: TrainingSetup) -> int:
    """The working set of a block's MLP backward: the gradients of the down projection's input and, gated, of
    the gate and up outputs."""
    return (3 if shape.gated_mlp else 2) * setup.tokens * shape.intermediate * setup.activation_bytes


def _host_bytes(setup: TrainingSetup, size: float) -> float:
    """The host memory a tensor of ``size`` bytes takes: CUDA's pinned-memory allocator hands out powers of two."""
    if setup.device == "cpu" or size <= 0:
        return size
    return 2 ** math.ceil(math.log2(size))


def _dropout_mask_bytes(setup: TrainingSetup) -> int:
    return setup.activation_bytes if setup.device == "cpu" else 1


def _block_tensors(shape: ModelShape, setup: TrainingSetup, first: bool) -> list[float]:
    """Bytes per token of each tensor one block keeps for backward. ``first``: the first block, whose input
    needs no gradient unless the embedding trains (so its first norm keeps only its output)."""
    p = setup.activation_bytes
    h, q, kv, f, heads, seq = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate, shape.heads, setup.seq
    trains_all = setup.method == "full"
    if shape.rms_norm:
        # input upcast to fp32 (or the fp32 input itself) + the fp32 rstd; the normalized input and
        # the output, each in the compute dtype; with a frozen norm weight only the output.
        norm = [4 * h, 4] + [p * h] * (2 if trains_all else 1)
        first_norm = norm if trains_all or not first else [p * h]
        if setup.attention == "eager":
            # contiguous q, keys and values repeated to all heads, fp32 softmax (+ its 16-bit copy), o_proj input
            attention = [p * q] * 4 + [heads * seq * 4] + ([heads * seq * 2] if p == 2 else [])
        else:
            attention = [p * q, p * kv, p * kv, p * q, 4 * heads]  # q, k, v, output (o_proj's input), logsumexp
        mlp = [p * f] * (4 if shape.gated_mlp else 5)
        tensors = first_norm + norm + attention + mlp
    else:
        mask = _dropout_mask_bytes(setup)
        # LayerNorm keeps input, output, mean and rstd (fp32); the first keeps only its output when
        # the embedding is frozen. Residual dropout after attention and MLP keeps two masks.
        norm = [p * h, p * h, 4, 4]
        first_norm = norm if trains_all or not first else [p * h]
        probs = [heads * seq * p, heads * seq * mask, heads * seq * p]  # softmax, dropout mask, dropped probabilities
        attention = [p * q] * 4 + probs  # q, k, v and the output projection's input
        mlp = [p * f] * 5  # gelu_new keeps its input, the cube path, tanh and both products
        tensors = first_norm + norm + attention + mlp + [mask * h] * 2
    if setup.method in ("lora", "qlora"):
        tensors += [setup.lora_r * setup.adapter_bytes] * len(shape.linear_shapes())
    return [float(t) for t in tensors]
