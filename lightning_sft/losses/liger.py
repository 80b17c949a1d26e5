"""Liger-Kernel's fused linear cross-entropy as a backend of ``linear_cross_entropy``: the backend rule and the call.

``resolve_backend`` is the only place that decides between the torch chunked loss and Liger's Triton kernel
(``pip install 'lightning-sft[liger]'``). liger-kernel is imported only when a call could use it: on CUDA
tensors, or with an explicit ``backend="liger"``. Its kernels run on CUDA, or on CPU tensors under the
Triton interpreter (``TRITON_INTERPRET=1`` set before Python starts), as the kernels of
:mod:`lightning_sft.kernels` do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from lightning_sft.kernels.dispatch import TORCH_INSTEAD, interpreter_requested

Backend = Literal["auto", "torch", "liger"]
BACKENDS = ("auto", "torch", "liger")
# Where the installed Liger kernels run: compiled for CUDA, or built by the Triton interpreter (CPU tensors).
Kernels = Literal["cuda", "interpreter"]
# The dtypes Liger's kernel computes in (its own tests' dtypes).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INSTALL = "pip install 'lightning-sft[liger]'"

@functools.cache
def liger_kernels() -> Kernels | None:
    """Where the installed Liger kernels run; None without liger-kernel. The first call imports it (seconds)."""
    try:
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return None
    return "interpreter" if isinstance(liger_cross_entropy_kernel, InterpretedFunction) else "cuda"


def unsupported(dtype: torch.dtype, chunk_size: int | None, head_grads_only: bool) -> str | None:
    """What in a one-term call Liger's kernel would not compute as the torch path does (None: nothing).

    ``head_grads_only``: the head's weight or bias needs a gradient and the hidden states do not; Liger
    (0.8) computes the head's gradients only along with the hidden states', and would give none.
    """
    if chunk_size is not None:
        return f"chunk_size={chunk_size} sets the torch path's chunks, and Liger sizes its own (leave it None)"
    if dtype not in DTYPES:
        return f"Liger computes in {[str(d).removeprefix('torch.') for d in DTYPES]}, got {dtype}"
    if head_grads_only:
        return ("the head needs a gradient and the hidden states do not, and Liger computes the head's gradient"
                " only along with theirs")
    return None


def resolve_backend(backend: Backend, device: torch.device, terms: int, why_not: str | None,
                    kernels: Callable[[], Kernels | None] = liger_kernels) -> Literal["torch", "liger"]:
    """The backend rule: "auto" means Liger for a one-term head on CUDA tensors when nothing in the call is
    ``unsupported`` (``why_not`` None) and liger-kernel imports, torch otherwise; an explicit "liger" that
    cannot run raises with the fix. A LoRA head (two terms) stays on torch: Liger's kernel takes one weight,
    and merging the adapter into it would build a ``(vocab, hidden)`` weight per step. ``kernels`` is asked
    only when the answer depends on it."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "liger" if device.type == "cuda" and terms == 1 and why_not is None and kernels() == "cuda" else "torch"
    if terms != 1:
        raise ValueError(
            f"backend='liger' takes a head of one term (one hidden, one weight), got {terms} (a LoRA head: the base"
            f" weight and the adapter's branch), and Liger's kernel sums no terms: {TORCH_INSTEAD}."
        )
    if why_not is not None:
        raise ValueError(f"backend='liger' cannot compute this call: {why_not}; {TORCH_INSTEAD}.")
    if device.type != "cuda" and not (device.type == "cpu" and interpreter_requested()):
        raise RuntimeError(
            f"backend='liger' got {device.type} tensors: Liger's Triton kernels run on CUDA, or on CPU only under"
            " the Triton interpreter. Set TRITON_INTERPRET=1 in the environment before Python starts (before"
            f" triton is imported), {TORCH_INSTEAD}."
        )
    where = kernels()
    if where is None:
        raise RuntimeError(f"backend='liger' needs liger-kernel: {INSTALL}, {TORCH_INSTEAD}.")
    if device.type == "cpu" and where != "interpreter":
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after liger-kernel's kernels were built, so they cannot run on CPU in this"
            f" process: set it before Python starts, {TORCH_INSTEAD}."
        )
    return "liger"


def liger_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, ignore_index: int,
                        label_smoothing: float, reduction: str) -> Tensor:
    """``linear_cross_entropy`` of flat ``(N, H)`` hidden states by Liger's kernel, with the torch path's
    conventions: logits in the weight's dtype, head gradients accumulated in fp32, and a mean over no kept
    label is nan (Liger returns 0)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(
        hidden.to(weight.dtype), weight, labels, None if bias is None else bias.to(weight.dtype),
        ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction, accum_dtype=torch.float32,
    )
    if reduction == "mean":
        loss = torch.where((labels != ignore_index).any(), loss, torch.nan)
    return loss
