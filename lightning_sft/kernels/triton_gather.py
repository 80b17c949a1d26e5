"""Triton gather-GEMM kernels: the selected rows/columns of a frozen weight are read in place.

Only ``dispatch`` imports this module, and only when a CUDA tensor (or the interpreter) needs it,
so ``import lightning_sft`` works without triton. The kernels are built when this module is
imported, which is why ``TRITON_INTERPRET=1`` must be set before that (``INTERPRETED`` records
which mode was actually built).

One kernel serves the four products. It computes ``C[M, N] = A[M, K] @ B[K, N] (+ bias[N])``
where ``B[k, n] = W[r(k) * stride_wk + c(n) * stride_wn]`` and exactly one of ``r``/``c`` goes
through ``idx`` (``GATHER_N`` says which). Seen through the logical ``(out, in)`` weight ``w``:

=================  ======  ======  =================  ==========
product            K       N       B[k, n]            gathered
=================  ======  ======  =================  ==========
rows forward       in      len     w[idx[n], k]       N
rows input grad    len     in      w[idx[k], n]       K
cols forward       len     out     w[n, idx[k]]       K
cols input grad    out     len     w[k, idx[n]]       N
=================  ======  ======  =================  ==========

Tiles over M (tokens) and N, loops over K, accumulates in fp32, masks ragged edges. Results are
stored (never accumulated atomically), so a launch can be repeated safely.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _gather_mm_kernel(
    a_ptr,
    w_ptr,
    idx_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_wk,
    stride_wn,
    stride_cm,
    stride_cn,
    GATHER_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if GATHER_N:
        w_n = tl.load(idx_ptr + offs_n, mask=mask_n, other=0)
    else:
        w_n = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if GATHER_N:
            w_k = offs_k.to(tl.int64)
        else:
            w_k = tl.load(idx_ptr + offs_k, mask=mask_k, other=0)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + w_k[:, None] * stride_wk + w_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        # The weight may be stored in another dtype (fp32 master weights under autocast).
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


INTERPRETED: bool = isinstance(_gather_mm_kernel, InterpretedFunction)

# tl.dot on bf16 gives garbage under the interpreter, so bf16 is GPU-only.
SUPPORTED_DTYPES: frozenset[torch.dtype] = (
    frozenset({torch.float16, torch.float32})
    if INTERPRETED
    else frozenset({torch.float16, torch.bfloat16, torch.float32})
)


def _block(size: int, cap: int) -> int:
    """Power-of-two tile no larger than needed; 16 is tl.dot's minimum."""
    return max(16, min(cap, triton.next_power_of_2(size)))


def _input_precision(dtype: torch.dtype) -> str:
    """Follow torch's fp32 matmul setting (TF32 only when torch itself would use it)."""
    if dtype == torch.float32 and not INTERPRETED and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _gather_mm(
    a: Tensor,
    w: Tensor,
    idx: Tensor,
    n: int,
    stride_wk: int,
    stride_wn: int,
    gather_n: bool,
    bias: Tensor | None = None,
) -> Tensor:
    """Launch the kernel for ``a (M, K)``; ``n`` is the output width, see the module table."""
    m, k = a.shape
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    block_m, block_n, block_k = _block(m, 64), _block(n, 64), _block(k, 32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gather_mm_kernel[grid](
        a,
        w,
        idx,
        out if bias is None else bias.contiguous(),  # never read when HAS_BIAS is False
        out,
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        stride_wk,
        stride_wn,
        out.stride(0),
        out.stride(1),
        GATHER_N=gather_n,
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=_input_precision(a.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=3,
    )
    return out


# The reference's signatures: nothing is gathered here, so there is never a slice to keep.


def rows_forward(
    x: Tensor, w: Tensor, idx: Tensor, bias: Tensor | None, keep: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``x @ w[idx].T + bias``; ``bias`` is already restricted to ``idx``."""
    return _gather_mm(x, w, idx, idx.numel(), w.stride(1), w.stride(0), True, bias), None


def rows_input_grad(g: Tensor, w: Tensor, idx: Tensor, kept: Tensor | None = None) -> Tensor:
    """``g @ w[idx]``."""
    return _gather_mm(g, w, idx, w.shape[1], w.stride(0), w.stride(1), False)


def cols_forward(
    h: Tensor, w: Tensor, idx: Tensor, bias: Tensor | None, keep: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``h @ w[:, idx].T + bias``."""
    return _gather_mm(h, w, idx, w.shape[0], w.stride(1), w.stride(0), False, bias), None


def cols_input_grad(g: Tensor, w: Tensor, idx: Tensor, kept: Tensor | None = None) -> Tensor:
    """``g @ w[:, idx]``."""
    return _gather_mm(g, w, idx, idx.numel(), w.stride(0), w.stride(1), True)
