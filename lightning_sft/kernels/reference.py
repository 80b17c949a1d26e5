"""Torch reference of the four gather-GEMM products: the CPU fast path and the tests' oracle.

Every function takes the weight as its logical ``(out, in)`` view (a transposed ``Conv1D`` weight
arrives as a strided ``.t()`` view, never a copy) and computes in the dtype of the activations.
Only the selected rows/columns are copied (``index_select``), never the whole weight.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def rows_forward(x: Tensor, w: Tensor, idx: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ w[idx].T + bias``; ``bias`` is already restricted to ``idx``."""
    return F.linear(x, w.index_select(0, idx).to(x.dtype), bias)


def rows_input_grad(g: Tensor, w: Tensor, idx: Tensor) -> Tensor:
    """``g @ w[idx]``: the gradient of ``rows_forward`` with respect to ``x``."""
    return g @ w.index_select(0, idx).to(g.dtype)


def cols_forward(h: Tensor, w: Tensor, idx: Tensor, bias: Tensor | None) -> Tensor:
    """``h @ w[:, idx].T + bias``."""
    return F.linear(h, w.index_select(1, idx).to(h.dtype), bias)


def cols_input_grad(g: Tensor, w: Tensor, idx: Tensor) -> Tensor:
    """``g @ w[:, idx]``: the gradient of ``cols_forward`` with respect to ``h``."""
    return g @ w.index_select(1, idx).to(g.dtype)

