"""Gather-GEMMs over frozen weights for contextual sparsity: compute only the selected output
channels (``rows_matmul``) or consume only the selected input channels (``cols_matmul``).

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

__all__ = ["available_backends", "cols_matmul", "resolve_backend", "rows_matmul", "sparse_matmul"]
