"""Which layers count as linear, and their shapes: the one place that knows layer types."""

from __future__ import annotations

import functools

from torch import nn


@functools.cache
def conv1d_type() -> type | None:
    """transformers' GPT-2 style ``Conv1D`` (weight stored as in x out), if transformers is present."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_supported_linear(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def weight_is_transposed(module: nn.Module) -> bool:
    """Conv1D keeps its weight as (in_features, out_features), the transpose of nn.Linear."""
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported linear layer."""
    if not is_supported_linear(module):
        raise TypeError(f"{type(module).__name__} is not a supported linear layer (nn.Linear or transformers Conv1D).")
    if isinstance(module, nn.Linear):  # its declared features: a 4-bit Linear4bit's weight is packed bytes
        return module.in_features, module.out_features
    rows, cols = module.weight.shape
    return (rows, cols) if weight_is_transposed(module) else (cols, rows)
