"""Torch reference of the four gather-GEMM products: the CPU fast path and the tests' oracle.

Every function takes the weight as its logical ``(out, in)`` view (a transposed ``Conv1D`` weight
arrives as a strided ``.t()`` view, never a copy) and computes in the dtype of the activations.
Only the selected rows/columns are copied (``index_select``), never the whole weight. A forward
asked to ``keep`` returns that copy too, and an input gradient given it skips its own gather.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def rows_forward(
    x: Tensor, w: Tensor, idx: Tensor, bias: Tensor | None, keep: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``x @ w[idx].T + bias``; ``bias`` is already restricted to ``idx``. With ``keep``, also ``w[idx]``."""
    w_idx = w.index_select(0, idx).to(x.dtype)
    return F.linear(x, w_idx, bias), (w_idx if keep else None)


def rows_input_grad(g: Tensor, w: Tensor, idx: Tensor, kept: Tensor | None = None) -> Tensor:
    """``g @ w[idx]``: the gradient of ``rows_forward`` with respect to ``x``."""
    return g @ (w.index_select(0, idx).to(g.dtype) if kept is None else kept)


def cols_forward(
    h: Tensor, w: Tensor, idx: Tensor, bias: Tensor | None, keep: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``h @ w[:, idx].T + bias``. With ``keep``, also ``w[:, idx]``."""
    w_idx = w.index_select(1, idx).to(h.dtype)
    return F.linear(h, w_idx, bias), (w_idx if keep else None)


def cols_input_grad(g: Tensor, w: Tensor, idx: Tensor, kept: Tensor | None = None) -> Tensor:
    """``g @ w[:, idx]``: the gradient of ``cols_forward`` with respect to ``h``."""
    return g @ (w.index_select(1, idx).to(g.dtype) if kept is None else kept)
