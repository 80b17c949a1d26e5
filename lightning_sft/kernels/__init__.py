"""Gather-GEMMs over frozen weights for contextual sparsity: compute only the selected output
channels (``rows_matmul``) or consume only the selected input channels (``cols_matmul``), of a
dense weight or of a 4-bit one (``Packed4bit``, decoding only the kept rows or columns).

Triton is imported only when a CUDA tensor (or ``TRITON_INTERPRET=1``) needs it. See
docs/kernels.md.
"""

from lightning_sft.kernels.dispatch import (
    available_backends,
    cols_matmul,
    resolve_backend,
    rows_matmul,
    sparse_matmul,
)
from lightning_sft.kernels.nf4 import Packed4bit

__all__ = ["Packed4bit", "available_backends", "cols_matmul", "resolve_backend", "rows_matmul", "sparse_matmul"]
