"""The sparse-delta wrapper: a frozen linear layer whose weight moves only at chosen entries.

The trainable state is ``delta_values`` (k numbers) at the flat positions ``delta_indices`` of the
base weight, so gradients and optimizer states take k entries, not the weight's size. The dense
effective weight exists only transiently inside forward and backward (rebuilt, never stored for
backward), like the dense weight gradient, which is gathered at the k positions and freed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sft.anatomy.linear import linear_features, weight_is_transposed
from lightning_sft.adapters.quantization import is_quantized

# Called with the layer and its dense weight gradient (in the weight's layout) during backward.
GradientObserver = Callable[["SparseDeltaLinear", torch.Tensor], None]


def _effective_weight(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(-1).index_add(0, indices, values.detach().to(weight.dtype)).view_as(weight)


class _SparseDeltaLinearFn(torch.autograd.Function):
    """y = x W_eff^T + b with W_eff = W + scatter(values at indices); gradients for x, values and b."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, layer: SparseDeltaLinear
    ) -> torch.Tensor:
        weight = _effective_weight(layer.base_layer.weight, layer.delta_indices, values)
        ctx.layer = layer
        ctx.save_for_backward(x, values)
        return _linear(x, weight, bias, layer.transposed)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, values = ctx.saved_tensors
        layer: SparseDeltaLinear = ctx.layer
        dtype = grad_out.dtype  # the forward's compute dtype (autocast may have lowered it)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _effective_weight(layer.base_layer.weight, layer.delta_indices, values).to(dtype)
            grad_x = (grad_out @ weight.t() if layer.transposed else grad_out @ weight).to(x.dtype)
        if ctx.needs_input_grad[1] or layer.gradient_observer is not None:
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            dense = x2.t() @ g2 if layer.transposed else g2.t() @ x2  # the weight's layout
            if layer.gradient_observer is not None:
                layer.gradient_observer(layer, dense)
            grad_values = dense.reshape(-1)[layer.delta_indices].to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0).to(layer.base_layer.bias.dtype)
        return grad_x, grad_values, grad_bias, None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if not transposed:
        return F.linear(x, weight, bias)
    out = x @ weight  # Conv1D keeps its weight as (in, out)
    return out if bias is None else out + bias


class SparseDeltaLinear(nn.Module):
    """A frozen ``nn.Linear`` / ``Conv1D`` plus trainable deltas at ``count`` of its weight entries.

    ``delta_indices`` (a buffer, saved in checkpoints) are flat positions in the base weight as
    stored, placeholders until a selection fills them; ``delta_values`` start at zero, so the wrapper
    starts as an exact no-op. Values train
    in fp32 over a 16-bit base, since small updates underflow in bf16.
    """

    def __init__(self, base_layer: nn.Module, count: int, selection: str) -> None:
        super().__init__()
        linear_features(base_layer)  # refuses anything but nn.Linear / Conv1D
        if is_quantized(base_layer):
            raise TypeError(
                "Sparse fine-tuning trains entries of the base weight, which a 4-bit (QLoRA) layer cannot hold;"
                " fine-tune an unquantized base, or use LoRA(quantize=...) instead."
            )
        weight = base_layer.weight
        if not 1 <= count <= weight.numel():
            raise ValueError(f"count must be in [1, {weight.numel()}] for a weight of shape {tuple(weight.shape)}.")
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.base_layer = base_layer
        self.transposed = weight_is_transposed(base_layer)
        self.selection = selection
        self.register_buffer("delta_indices", torch.arange(count, device=weight.device))
        self.delta_values = nn.Parameter(torch.zeros(count, dtype=dtype, device=weight.device))
        self.gradient_observer: GradientObserver | None = None
        self.selected = False  # True once a selection (or a checkpoint) has filled delta_indices

    @property
    def count(self) -> int:
        return self.delta_values.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not (self.delta_values.requires_grad or self.gradient_observer):
            weight = _effective_weight(self.base_layer.weight, self.delta_indices, self.delta_values)
            return _linear(x, weight, self.base_layer.bias, self.transposed)
        return _SparseDeltaLinearFn.apply(x, self.delta_values, self.base_layer.bias, self)

    @torch.no_grad()
    def tuned_weight(self) -> torch.Tensor:
        """The base weight with the deltas added, exactly as the forward computes it (a new tensor)."""
        return _effective_weight(self.base_layer.weight, self.delta_indices, self.delta_values)

    def extra_repr(self) -> str:
        numel = self.base_layer.weight.numel()
        return f"count={self.count}, density={self.count / numel:.4f}, selection={self.selection!r}"


def sparse_delta_layers(root: nn.Module) -> dict[str, SparseDeltaLinear]:
    """Every sparse-delta layer under ``root`` by its name relative to ``root``."""
    return {name: m for name, m in root.named_modules() if isinstance(m, SparseDeltaLinear)}
