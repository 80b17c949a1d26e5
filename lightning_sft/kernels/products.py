"""The autograd Functions of the gather-GEMMs over frozen weights: a dense weight on one backend, and a
4-bit ``Packed4bit`` decoded slice by slice. The weight never gets a gradient; ``keep_slice`` decides
whether backward reuses the forward's slice or makes it again. ``kernels.dispatch`` checks the
arguments and calls these.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_sft.kernels import nf4
from lightning_sft.kernels.nf4 import Packed4bit

Kind = Literal["rows", "cols"]


def keep_slice(rows: int, in_width: int, out_width: int) -> bool:
    """Whether a product of ``rows`` activation rows with a copied (or decoded) ``in_width x out_width``
    weight slice keeps the slice for backward instead of making it again: when it is no larger than
    the bigger activation of the product (input or output), so the memory it holds stays of the order
    the step holds anyway. High sparsity keeps, low recopies."""
    return in_width * out_width <= rows * max(in_width, out_width)


def _keep_slice(kind: Kind, a: Tensor, w: Tensor, idx: Tensor) -> bool:
    """``keep_slice`` for ``W[idx]`` (rows) or ``W[:, idx]`` (cols)."""
    in_width, out_width = (w.shape[1], idx.numel()) if kind == "rows" else (idx.numel(), w.shape[0])
    return keep_slice(a.shape[0], in_width, out_width)


def rows_bias_grad(kept: Tensor, idx: Tensor, length: int) -> Tensor:
    """The full bias gradient of a ``rows`` product: ``kept`` at ``idx``, zero for the dropped output
    channels, as in the dense model."""
    return kept.new_zeros(length).index_copy_(0, idx, kept)


def _product_bias(ctx: Any, kind: Kind, bias: Tensor | None, idx: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The bias a product adds (``b[idx]`` for rows, all of ``b`` for cols) in ``dtype``; notes on ``ctx``
    what ``_bias_grad`` needs."""
    if bias is None:
        return None
    ctx.bias_dtype, ctx.bias_len = bias.dtype, bias.numel()
    return (bias.index_select(0, idx) if kind == "rows" else bias).to(dtype)


def _bias_grad(ctx: Any, kind: Kind, g: Tensor, idx: Tensor) -> Tensor:
    """The bias gradient of a product's output gradient ``g``, full length (zero on dropped rows)."""
    grad = g.sum(0).to(ctx.bias_dtype)
    return rows_bias_grad(grad, idx, ctx.bias_len) if kind == "rows" else grad


class SparseMatmul(torch.autograd.Function):
    """Forward and the input-gradient product on one backend. The weight is frozen, so it gets
    no gradient; backward reads it again (the torch backend reuses its forward copy of ``W[idx]``
    when ``_keep_slice`` allows)."""

    @staticmethod
    def forward(
        ctx, kind: Kind, a: Tensor, w: Tensor, idx: Tensor, bias: Tensor | None, ops: ModuleType
    ) -> Tensor:
        bias = _product_bias(ctx, kind, bias, idx, a.dtype)
        ctx.kind, ctx.ops = kind, ops
        keep = ctx.needs_input_grad[1] and _keep_slice(kind, a, w, idx)
        forward = ops.rows_forward if kind == "rows" else ops.cols_forward
        out, kept = forward(a, w, idx, bias, keep)
        ctx.save_for_backward(w, idx, kept)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        w, idx, kept = ctx.saved_tensors
        grad_a = grad_bias = None
        if ctx.needs_input_grad[1]:
            input_grad = ctx.ops.rows_input_grad if ctx.kind == "rows" else ctx.ops.cols_input_grad
            grad_a = input_grad(g, w, idx, kept)
        if ctx.needs_input_grad[4]:
            grad_bias = _bias_grad(ctx, ctx.kind, g, idx)
        return None, grad_a, None, None, grad_bias, None


def _decode_slice(kind: Kind, packed: Packed4bit, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """``W[idx]`` (rows) or ``W[:, idx]`` (cols) of a 4-bit weight, decoding only those, cast to ``dtype``."""
    w = nf4.decode(packed, rows=idx) if kind == "rows" else nf4.decode(packed, cols=idx)
    return w.to(dtype)


class Packed4bitMatmul(torch.autograd.Function):
    """``a @ W[idx].T + b[idx]`` (rows) or ``a @ W[:, idx].T + b`` (cols) over a frozen 4-bit weight,
    ``a`` ``(tokens, features)``: only the selected slice is decoded, in forward and (unless kept, by
    ``keep_slice``) again in backward. Computes in ``packed.compute_dtype`` (else ``a``'s), returns in
    ``a``'s dtype; gradients reach ``a`` and ``bias``, never the weight."""

    @staticmethod
    def forward(ctx, kind: Kind, a: Tensor, packed: Packed4bit, idx: Tensor, bias: Tensor | None) -> Tensor:
        dtype = packed.compute_dtype or a.dtype
        w = _decode_slice(kind, packed, idx, dtype)
        b = _product_bias(ctx, kind, bias, idx, dtype)
        out = torch.nn.functional.linear(a.to(dtype), w, b).to(a.dtype)
        keep = ctx.needs_input_grad[1] and keep_slice(a.shape[0], w.shape[1], w.shape[0])
        ctx.kind, ctx.packed, ctx.dtype, ctx.a_dtype = kind, packed, dtype, a.dtype
        ctx.save_for_backward(idx, w if keep else None)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        idx, w = ctx.saved_tensors
        grad_a = grad_bias = None
        if ctx.needs_input_grad[1]:
            if w is None:
                w = _decode_slice(ctx.kind, ctx.packed, idx, ctx.dtype)
            grad_a = (g.to(ctx.dtype) @ w).to(ctx.a_dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = _bias_grad(ctx, ctx.kind, g, idx)
        return None, grad_a, None, None, grad_bias
