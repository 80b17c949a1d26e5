"""Torch reference of the four gather-GEMM products: the CPU fast path and the tests' oracle.

Every function takes the weight as its logical ``(out, in)`` view (a transposed ``Conv1D`` weight
arrives as a strided ``.t()`` view, never a copy) and computes in the dtype of the activations.
Only the selected rows/columns are copied (``index_select``), never the whole weight. A forward
asked to ``keep`` returns that copy too, and an input gradient given it skips its own gather.

A slice that is not kept lives only for one product, so on CPU it is gathered into a reused
per-thread scratch buffer (``scratch``): a fresh multi-megabyte tensor per product would cost a
page fault per 4 KiB on first touch, as much as the gather itself.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

_SCRATCH = threading.local()


def scratch(rows: int, cols: int, like: Tensor) -> Tensor:
    """An uninitialised ``(rows, cols)`` tensor of ``like``'s dtype and device for a slice used by one
    product only: on CPU a view of a reused per-thread buffer (grown as needed), elsewhere a new tensor
    (CUDA's caching allocator already reuses memory)."""
    if like.device.type != "cpu":
        return like.new_empty(rows, cols)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buffer = buffers.get(like.dtype)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = buffers[like.dtype] = torch.empty(rows * cols, dtype=like.dtype)
    return buffer[: rows * cols].view(rows, cols)


def _gather(w: Tensor, dim: int, idx: Tensor, like: Tensor, keep: bool) -> Tensor:
    """``w.index_select(dim, idx)`` in ``like``'s dtype: a new tensor when kept for backward, else scratch."""
    shape = (idx.numel(), w.shape[1]) if dim == 0 else (w.shape[0], idx.numel())
    if keep or w.dtype != like.dtype:
        return w.index_select(dim, idx).to(like.dtype)
    return torch.index_select(w, dim, idx, out=scratch(*shape, like))


def rows_forward(
    x: Tensor, w: Tensor, idx: Tensor, bias: Tensor | None, keep: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``x @ w[idx].T + bias``; ``bias`` is already restricted to ``idx``. With ``keep``, also ``w[idx]``."""
    w_idx = _gather(w, 0, idx, x, keep)
    return F.linear(x, w_idx, bias), (w_idx if keep else None)


def rows_input_grad(g: Tensor, w: Tensor, idx: Tensor, kept: Tensor | None = None) -> Tensor:
    """``g @ w[idx]``: the gradient of ``rows_forward`` with respect to ``x``."""
    return g @ (_gather(w, 0, idx, g, False) if kept is None else kept)


def cols_forward(
    h: Tensor, w: Tensor, idx: Tensor, bias: Tensor | None, keep: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``h @ w[:, idx].T + bias``. With ``keep``, also ``w[:, idx]``."""
    w_idx = _gather(w, 1, idx, h, keep)
    return F.linear(h, w_idx, bias), (w_idx if keep else None)


def cols_input_grad(g: Tensor, w: Tensor, idx: Tensor, kept: Tensor | None = None) -> Tensor:
    """``g @ w[:, idx]``: the gradient of ``cols_forward`` with respect to ``h``."""
    return g @ (_gather(w, 1, idx, g, False) if kept is None else kept)
