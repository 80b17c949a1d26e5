"""The products a sparse block runs on one projection: output rows ``idx`` (producers), input columns
``idx`` (consumers), several producers sharing one input's GEMMs, and the eval-mode dense product. A
LoRA branch keeps its dense value on the kept channels; a 4-bit base decodes only what is kept.
Pure torch (no Lightning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.adapters.quantization import is_quantized, packed_weight, quantized_linear
from lightning_sft.anatomy.linear import weight_is_transposed
from lightning_sft.kernels import sparse_matmul
from lightning_sft.kernels.dispatch import fused_rows_matmul


def linear_eval(layer: nn.Module, x: Tensor, bias: bool = True) -> Tensor:
    """A projection (LoRA branch included) as in eval mode: no dropout, whatever ``training`` is."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    if is_quantized(base):
        out = quantized_linear(base, x, bias)
    else:
        weight = base.weight.t() if weight_is_transposed(base) else base.weight
        out = F.linear(x.to(weight.dtype), weight, base.bias if bias else None)
    if isinstance(layer, LoRALinear) and not layer.merged:
        lora = F.linear(F.linear(x.to(layer.lora_A.dtype), layer.lora_A), layer.lora_B) * layer.scaling
        out = out + lora.to(out.dtype)
    return out


def _sparse_product(kind: str, layer: nn.Module, a: Tensor, idx: Tensor) -> Tensor:
    """``rows``: output rows ``idx`` of a projection of ``a``; ``cols``: the projection of ``a`` holding
    only input columns ``idx`` (the others zero). A 4-bit base decodes only those rows or columns; a
    LoRA branch keeps its dense value on them: ``(a A^T s) B[idx]^T``, or ``(a A[:, idx]^T s) B^T``."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    if is_quantized(base):
        out = sparse_matmul(kind, a, packed_weight(base), idx, base.bias, check_idx=False)
    else:
        out = sparse_matmul(kind, a, base.weight, idx, base.bias, transposed=weight_is_transposed(base), check_idx=False)
    if not isinstance(layer, LoRALinear):
        return out
    x = layer.dropout(a).to(layer.lora_A.dtype)
    if kind == "rows":
        return _add_lora_rows(out, layer, F.linear(x, layer.lora_A), idx)
    h = F.linear(x, layer.lora_A.index_select(1, idx)) * layer.scaling
    return out + F.linear(h, layer.lora_B).to(out.dtype)


def sparse_rows(layer: nn.Module, x: Tensor, idx: Tensor) -> Tensor:
    """Output rows ``idx`` of a projection (producers: gate/up, fc1, q/k/v)."""
    return _sparse_product("rows", layer, x, idx)


def sparse_cols(layer: nn.Module, h: Tensor, idx: Tensor) -> Tensor:
    """The projection of ``h`` holding only input columns ``idx`` (consumers: down, fc2, o)."""
    return _sparse_product("cols", layer, h, idx)


def _add_lora_rows(out: Tensor, layer: LoRALinear, h: Tensor, idx: Tensor) -> Tensor:
    """``out + (h s) B[idx]^T``, with ``h = dropout(x) A^T`` already computed."""
    return out + F.linear(h * layer.scaling, layer.lora_B.index_select(0, idx)).to(out.dtype)


def fusable(layer: nn.Module) -> bool:
    """Whether a producer can share its input's GEMMs with its siblings: a plain (not 4-bit) base, and
    no LoRA dropout drawing a mask of its own."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    if is_quantized(base):
        return False
    return not isinstance(layer, LoRALinear) or isinstance(layer.dropout, nn.Identity) or not layer.training


def fused_sparse_rows(layers: list[nn.Module], x: Tensor, indices: list[Tensor]) -> list[Tensor]:
    """``[sparse_rows(layer, x, idx) ...]`` for producers reading the same ``x`` (``fusable`` ones):
    one gather-GEMM for the bases and one GEMM for the LoRA A matrices (``x [A_1; A_2; ...]^T``)."""
    bases = [layer.base_layer if isinstance(layer, LoRALinear) else layer for layer in layers]
    outs = fused_rows_matmul(
        x, [b.weight for b in bases], indices, [b.bias for b in bases], [weight_is_transposed(b) for b in bases]
    )
    adapted = [i for i, layer in enumerate(layers) if isinstance(layer, LoRALinear)]
    dtypes = {layers[i].lora_A.dtype for i in adapted}
    if len(dtypes) == 1:
        a_cat = torch.cat([layers[i].lora_A for i in adapted])
        hs = F.linear(x.to(a_cat.dtype), a_cat).split([layers[i].r for i in adapted], dim=-1)
    else:
        hs = [F.linear(x.to(layers[i].lora_A.dtype), layers[i].lora_A) for i in adapted]
    for i, h in zip(adapted, hs):
        outs[i] = _add_lora_rows(outs[i], layers[i], h, indices[i])
    return outs
