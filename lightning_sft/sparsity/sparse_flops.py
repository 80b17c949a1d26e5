"""The FLOPs a sparse step skips: dense vs sparse cost of the frozen projections of a block.
Pure Python (no Lightning, no tensors)."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_sft.sparsity.schedule import _check_count


@dataclass(frozen=True)
class SparseFlops:
    """Dense vs sparse FLOPs of the frozen projections of a block, forward and input-gradient
    backward (frozen weights get no weight gradient; the LoRA branch stays dense and is excluded)."""

    dense_forward: int
    sparse_forward: int
    dense_backward: int
    sparse_backward: int

    @property
    def dense(self) -> int:
        return self.dense_forward + self.dense_backward

    @property
    def sparse(self) -> int:
        return self.sparse_forward + self.sparse_backward

    @property
    def skipped(self) -> int:
        """What to pass to ``lightning_sft.flops.report_skipped_flops``."""
        return self.dense - self.sparse

    def __add__(self, other: SparseFlops) -> SparseFlops:
        return SparseFlops(
            self.dense_forward + other.dense_forward,
            self.sparse_forward + other.sparse_forward,
            self.dense_backward + other.dense_backward,
            self.sparse_backward + other.sparse_backward,
        )


def _flops(dense_macs: int, sparse_macs: int, context_tokens: int, output_tokens: int) -> SparseFlops:
    """From multiply-adds per token (2 FLOPs each): context tokens run sparse, output tokens dense;
    the input gradient of a linear layer costs what its forward costs."""
    _check_count(context_tokens, "context_tokens")
    _check_count(output_tokens, "output_tokens")
    dense = 2 * dense_macs * (context_tokens + output_tokens)
    sparse = 2 * (sparse_macs * context_tokens + dense_macs * output_tokens)
    return SparseFlops(dense, sparse, dense, sparse)


def mlp_flops(
    hidden: int, intermediate: int, *, context_tokens: int, output_tokens: int, kept: int, gated: bool = True
) -> SparseFlops:
    """gate/up/down (``gated``) or fc1/fc2 projections with ``kept`` of ``intermediate`` channels."""
    _check_count(hidden, "hidden", 1)
    _check_count(intermediate, "intermediate", 1)
    if _check_count(kept, "kept", 1) > intermediate:
        raise ValueError(f"kept={kept} exceeds intermediate={intermediate}.")
    linears = 3 if gated else 2
    return _flops(linears * hidden * intermediate, linears * hidden * kept, context_tokens, output_tokens)


def attention_projection_flops(
    hidden: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    context_tokens: int,
    output_tokens: int,
    kept_qk: int,
    kept_v: int,
) -> SparseFlops:
    """q/k/v/o projections with ``kept_qk`` and ``kept_v`` of the ``num_kv_heads * head_dim`` kv
    channels kept; the query side keeps ``group * kept_qk`` rows and o_proj ``group * kept_v``
    columns (``attention_indices``). The attention matmuls themselves are not included."""
    for label, value in (("hidden", hidden), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                         ("head_dim", head_dim)):
        _check_count(value, label, 1)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}.")
    kv = num_kv_heads * head_dim
    for label, value in (("kept_qk", kept_qk), ("kept_v", kept_v)):
        if _check_count(value, label, 1) > kv:
            raise ValueError(f"{label}={value} exceeds the {kv} kv channels.")
    group = num_heads // num_kv_heads
    dense = hidden * (2 * num_heads * head_dim + 2 * kv)
    sparse = hidden * (group * kept_qk + kept_qk + kept_v + group * kept_v)
    return _flops(dense, sparse, context_tokens, output_tokens)
