"""Gather-GEMMs over frozen weights: argument checks, the backend rule and the entry points (their autograd
Functions are in ``kernels.products``).

``resolve_backend`` is the only place that decides between the torch reference and the Triton
kernels; ``sparse_matmul`` is the only entry point that calls it. A 4-bit weight (``nf4.Packed4bit``)
takes the same entry point: only its kept rows or columns are decoded (torch).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

from lightning_sft.kernels import reference
from lightning_sft.kernels.indices import check_indices
from lightning_sft.kernels.nf4 import Packed4bit
from lightning_sft.kernels.products import Kind, Packed4bitMatmul, SparseMatmul, keep_slice, rows_bias_grad
Backend = Literal["auto", "torch", "triton"]
_KINDS = ("rows", "cols")
_BACKENDS = ("auto", "torch", "triton")
TORCH_INSTEAD = "or pass backend='torch' (or 'auto')"  # how every refused Triton backend ends its message


def interpreter_requested() -> bool:
    """Whether the environment asks Triton for its CPU interpreter (it must, before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_ops() -> ModuleType | None:
    """Import (and so build) the Triton kernels once, on first need; None without triton."""
    try:
        from lightning_sft.kernels import triton_gather
    except ImportError:
        return None
    return triton_gather


def available_backends() -> tuple[str, ...]:
    """Backends usable in this process. Checks triton without importing it."""
    triton_usable = importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or interpreter_requested()
    )
    return ("torch", "triton") if triton_usable else ("torch",)


def resolve_backend(backend: Backend, device: torch.device, dtype: torch.dtype) -> Literal["torch", "triton"]:
    """The backend rule: "auto" means Triton for CUDA tensors of a dtype it supports when triton
    imports, torch otherwise; an explicit "triton" that cannot run raises with the fix."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        ops = _triton_ops()
        return "triton" if ops is not None and dtype in ops.SUPPORTED_DTYPES else "torch"
    on_cuda = device.type == "cuda"
    if not on_cuda and not interpreter_requested():
        raise RuntimeError(
            f"backend='triton' got {device.type} tensors: the Triton kernels run on CUDA, or on CPU "
            "only under the Triton interpreter. Set TRITON_INTERPRET=1 in the environment before "
            f"Python starts (before triton is imported), {TORCH_INSTEAD}."
        )
    ops = _triton_ops()
    if ops is None:
        raise RuntimeError(f"backend='triton' needs the triton package: pip install triton, {TORCH_INSTEAD}.")
    if not on_cuda and not ops.INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after the Triton kernels were built, so they cannot run on "
            f"CPU in this process: set it before Python starts, {TORCH_INSTEAD}."
        )
    if dtype not in ops.SUPPORTED_DTYPES:
        names = sorted(str(d).removeprefix("torch.") for d in ops.SUPPORTED_DTYPES)
        why = " (tl.dot on bf16 is wrong under the Triton interpreter)" if ops.INTERPRETED else ""
        raise ValueError(f"backend='triton' computes in {names}, got {dtype}{why}; {TORCH_INSTEAD}.")
    return "triton"


def _check_weight(weight: Tensor | Packed4bit, transposed: bool, backend: Backend) -> Tensor | Packed4bit:
    """The weight's logical ``(out, in)`` view after the checks every weight gets: a frozen 2-D tensor
    (``transposed``: stored ``(in, out)``), or a ``Packed4bit`` (stored ``(out, in)``, torch backend)."""
    if isinstance(weight, Packed4bit):
        if transposed:
            raise ValueError("a Packed4bit weight is stored (out, in): pass transposed=False")
        if backend == "triton":
            raise ValueError(
                "4-bit (Packed4bit) weights run on the torch backend only (it decodes the kept slice); "
                "pass backend='torch' or 'auto'"
            )
        return weight
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor (or a kernels.Packed4bit)")
    if weight.requires_grad:
        raise ValueError(
            "frozen weights only: weight.requires_grad is True, and these kernels give no weight "
            "gradient. Freeze it (weight.requires_grad_(False)) or use F.linear for a trained weight."
        )
    return weight.t() if transposed else weight


def _check_operands(kind: Kind, a: Tensor, w: Tensor | Packed4bit, idx: Tensor, bias: Tensor | None) -> None:
    if not a.is_floating_point() or a.dim() == 0:
        raise ValueError(
            "the activation must be a floating-point tensor of shape (..., features), "
            f"got {a.dtype} {tuple(a.shape)}"
        )
    if a.device != w.device:
        raise ValueError(f"the activation is on {a.device} but the weight is on {w.device}")
    width = w.shape[1] if kind == "rows" else idx.numel()
    if a.shape[-1] != width:
        what = "in_features" if kind == "rows" else "len(idx)"
        raise ValueError(f"{kind}_matmul needs a last dimension of {what} = {width}, got {tuple(a.shape)}")
    if bias is not None and (bias.shape != (w.shape[0],) or bias.device != w.device):
        raise ValueError(
            f"bias must have shape ({w.shape[0]},) on {w.device} (the full layer bias), "
            f"got {tuple(bias.shape)} on {bias.device}"
        )


def _compute_dtype(a: Tensor, weight: Tensor, bias: Tensor | None) -> torch.dtype:
    """Under autocast, like nn.Linear, compute in the autocast dtype (only the gathered slice of
    the weight is cast); otherwise every operand must already share one dtype."""
    if torch.is_autocast_enabled(a.device.type):
        return torch.get_autocast_dtype(a.device.type)
    dtypes = {a.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) > 1:
        raise ValueError(
            f"activation, weight and bias dtypes differ ({sorted(map(str, dtypes))}): "
            "cast them, or run under torch.autocast"
        )
    return a.dtype


def sparse_matmul(
    kind: Kind,
    a: Tensor,
    weight: Tensor | Packed4bit,
    idx: Tensor,
    bias: Tensor | None = None,
    *,
    transposed: bool = False,
    backend: Backend = "auto",
    check_idx: bool = True,
) -> Tensor:
    """``kind="rows"``: ``a @ W[idx].T + bias[idx]`` (only output channels ``idx``);
    ``kind="cols"``: ``a @ W[:, idx].T + bias`` (``a`` holds only input channels ``idx``).

    ``weight`` is a frozen ``(out, in)`` matrix, or ``(in, out)`` with ``transposed=True``
    (GPT-2 ``Conv1D``), read through strides without a copy. ``idx`` is a sorted, unique int64
    tensor on the weight's device; ``check_idx=False`` skips the value checks, which cost one
    device sync per call on CUDA. Gradients flow to ``a`` and ``bias``, never to ``weight``.

    ``weight`` may also be a 4-bit ``Packed4bit`` (``(out, in)``, torch backend): only the kept
    rows or columns are decoded; the product runs in its ``compute_dtype`` (else ``a``'s) and
    returns in ``a``'s dtype, as bitsandbytes' ``Linear4bit`` does.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    w = _check_weight(weight, transposed, backend)  # logical (out, in) view
    check_indices(idx, w.shape[0] if kind == "rows" else w.shape[1], w.device, values=check_idx)
    _check_operands(kind, a, w, idx, bias)
    flat = a.reshape(a.shape[:-1].numel(), a.shape[-1])  # not -1: a may have 0 features (k = 0)
    if isinstance(w, Packed4bit):
        out = Packed4bitMatmul.apply(kind, flat, w, idx, bias)
    else:
        dtype = _compute_dtype(a, weight, bias)
        ops = reference if resolve_backend(backend, a.device, dtype) == "torch" else _triton_ops()
        out = SparseMatmul.apply(kind, flat.to(dtype), w, idx, bias, ops)
    return out.reshape(*a.shape[:-1], out.shape[-1])


def rows_matmul(
    x: Tensor,
    weight: Tensor | Packed4bit,
    idx: Tensor,
    bias: Tensor | None = None,
    *,
    transposed: bool = False,
    backend: Backend = "auto",
    check_idx: bool = True,
) -> Tensor:
    """``x @ W[idx].T (+ bias[idx])``: output channels ``idx`` only, shape ``(..., len(idx))``.
    For the projections whose outputs are sparsified (gate/up, q/k/v)."""
    return sparse_matmul("rows", x, weight, idx, bias, transposed=transposed, backend=backend, check_idx=check_idx)


def cols_matmul(
    h: Tensor,
    weight: Tensor | Packed4bit,
    idx: Tensor,
    bias: Tensor | None = None,
    *,
    transposed: bool = False,
    backend: Backend = "auto",
    check_idx: bool = True,
) -> Tensor:
    """``h @ W[:, idx].T (+ bias)``: ``h (..., len(idx))`` holds input channels ``idx`` only;
    shape ``(..., out)``. For the projections that consume them (down_proj, o_proj)."""
    return sparse_matmul("cols", h, weight, idx, bias, transposed=transposed, backend=backend, check_idx=check_idx)


def _gather_rows(
    weights: tuple[Tensor, ...], indices: tuple[Tensor, ...], widths: list[int], like: Tensor, keep: bool
) -> Tensor:
    """The selected rows of every weight, stacked into one ``(sum k, in)`` slice in ``like``'s dtype,
    gathered straight into it (no per-weight temporary, no concatenation copy); a slice used by one
    product only goes to ``reference.scratch``."""
    rows, cols = sum(widths), weights[0].shape[1]
    out = like.new_empty(rows, cols) if keep else reference.scratch(rows, cols, like)
    offset = 0
    for w, idx, k in zip(weights, indices, widths):
        if w.dtype == like.dtype:
            torch.index_select(w, 0, idx, out=out[offset : offset + k])
        else:
            out[offset : offset + k] = w.index_select(0, idx)
        offset += k
    return out


class _FusedRows(torch.autograd.Function):
    """``rows`` products of several frozen weights that read one activation, as one GEMM over the
    concatenated row slices (torch backend). Backward is one GEMM too, reusing the forward's slice
    when ``keep_slice`` allows."""

    @staticmethod
    def forward(ctx, a: Tensor, widths: list[int], *operands: Tensor | None) -> Tensor:
        parts = len(widths)
        weights, indices, biases = operands[:parts], operands[parts : 2 * parts], operands[2 * parts :]
        total = sum(widths)
        keep = ctx.needs_input_grad[0] and keep_slice(a.shape[0], a.shape[1], total)
        w_cat = _gather_rows(weights, indices, widths, a, keep)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([
                (b.index_select(0, idx) if b is not None else a.new_zeros(k)).to(a.dtype)
                for b, idx, k in zip(biases, indices, widths)
            ])
        ctx.widths, ctx.bias_info = widths, [(b.dtype, b.numel()) if b is not None else None for b in biases]
        ctx.save_for_backward(w_cat if keep else None, *weights, *indices)
        return torch.nn.functional.linear(a, w_cat, bias)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        parts = len(ctx.widths)
        weights, indices = saved[1 : 1 + parts], saved[1 + parts :]
        grad_a = None
        if ctx.needs_input_grad[0]:
            w_cat = saved[0] if saved[0] is not None else _gather_rows(weights, indices, ctx.widths, g, keep=False)
            grad_a = g @ w_cat
        grad_biases: list[Tensor | None] = []
        for n, (info, chunk, idx) in enumerate(zip(ctx.bias_info, g.split(ctx.widths, dim=1), indices)):
            if info is None or not ctx.needs_input_grad[2 + 2 * parts + n]:
                grad_biases.append(None)
                continue
            dtype, length = info
            grad_biases.append(rows_bias_grad(chunk.sum(0).to(dtype), idx, length))
        return (grad_a, None, *([None] * (2 * parts)), *grad_biases)


def fused_rows_matmul(
    x: Tensor,
    weights: list[Tensor],
    indices: list[Tensor],
    biases: list[Tensor | None],
    transposed: list[bool],
    *,
    backend: Backend = "auto",
) -> list[Tensor]:
    """``[rows_matmul(x, w, idx, b) for each part]`` for projections that read the same ``x`` (gate and
    up, or q, k and v): on the torch backend one gather into one slice and one GEMM (and one GEMM in
    backward) instead of one per weight; the Triton kernels run per weight (they copy nothing).
    Index values are not checked (``check_idx=False`` semantics)."""
    if not (len(weights) == len(indices) == len(biases) == len(transposed)) or not weights:
        raise ValueError("fused_rows_matmul needs one index, bias and transposed flag per weight, and >= 1 weight")
    views = [w.t() if t else w for w, t in zip(weights, transposed)]
    for w, idx, bias in zip(views, indices, biases):
        if w.requires_grad:
            raise ValueError("frozen weights only: a weight requires grad; use F.linear for trained weights.")
        check_indices(idx, w.shape[0], w.device, values=False)
        _check_operands("rows", x, w, idx, bias)
    dtype = _compute_dtype(x, views[0], biases[0])
    if len(views) == 1 or resolve_backend(backend, x.device, dtype) == "triton":
        return [
            sparse_matmul("rows", x, w, idx, b, transposed=t, backend=backend, check_idx=False)
            for w, idx, b, t in zip(weights, indices, biases, transposed)
        ]
    flat = x.reshape(x.shape[:-1].numel(), x.shape[-1]).to(dtype)
    widths = [idx.numel() for idx in indices]
    out = _FusedRows.apply(flat, widths, *views, *indices, *biases)
    return [part.reshape(*x.shape[:-1], part.shape[-1]) for part in out.split(widths, dim=-1)]
