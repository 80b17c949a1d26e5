"""What a projection is underneath its wrappers: the base layer that sliced products compute with
(``projection_base``) and its weight in nn.Linear layout (``logical_weight``).

Kept apart from ``linear`` because it unwraps ``LoRALinear`` and 4-bit layers, and those adapters
import ``linear`` themselves.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.adapters.quantization import dense_view, is_quantized
from lightning_sft.anatomy.linear import conv1d_type, weight_is_transposed

# nn.Linear subclasses whose forward is exactly ``x @ W.T + b`` (class names in transformers).
LINEAR_EQUIVALENTS: frozenset[str] = frozenset({"FalconLinear"})


def _is_exact_linear(module: nn.Module) -> bool:
    kind = type(module)
    if kind is nn.Linear or kind is conv1d_type():
        return True
    return kind.__name__ in LINEAR_EQUIVALENTS and kind.__module__.startswith("transformers.") and isinstance(
        module, nn.Linear
    )


def projection_base(layer: nn.Module, name: str, frozen: bool = True) -> nn.Module:
    """The base layer of a projection (inside ``LoRALinear`` if wrapped), checked for what the sliced
    products compute: a plain linear map (nn.Linear, transformers Conv1D, ``LINEAR_EQUIVALENTS``) or a
    4-bit bitsandbytes ``Linear4bit``; with ``frozen``, a weight that needs no gradient."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    if isinstance(layer, LoRALinear) and layer.merged:
        raise ValueError(
            f"{name} is a merged LoRA layer: its base weight holds the adapter, which would be sparsified."
            " Call unmerge_adapter(model) before using contextual sparsity."
        )
    if not _is_exact_linear(base) and not is_quantized(base):
        raise TypeError(
            f"{name} is a {type(base).__name__}; contextual sparsity supports nn.Linear, transformers Conv1D,"
            f" {', '.join(sorted(LINEAR_EQUIVALENTS))} or 4-bit bitsandbytes Linear4bit projections, optionally"
            " wrapped in LoRALinear."
        )
    if frozen and base.weight.requires_grad:
        raise ValueError(
            f"{name}.weight requires grad; sparse projections need a frozen base"
            " (inject LoRA or freeze the base model first)."
        )
    return base


def logical_weight(base: nn.Module) -> Tensor:
    """The frozen weight in nn.Linear layout (out, in): Conv1D's transposed view, a 4-bit weight's
    decode-on-use view; never a copy."""
    return base.weight.t() if weight_is_transposed(base) else dense_view(base)
