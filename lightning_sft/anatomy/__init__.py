"""Finding things in a user's model by structure, not by class: which layers are linear and their
shapes (``linear``), the base layer under a projection's wrappers (``projections``), the stacks of
residual blocks (``stacks``), the channel groups of its MLP and attention blocks (``channels``
finds them from the family entries in ``layouts`` and returns the dataclasses of ``description``:
which rows of which projections produce a channel, which columns consume it), and replacing a
submodule by name or putting back a wrapped forward (``modules``).

Pure torch (no Lightning). Every method imports its structural facts from here. The names below are
loaded on first use, so ``lightning_sft.anatomy.linear`` can be imported by the adapters that
``projections`` itself unwraps. See ``docs/contextual_sparsity.md`` ("Adding a model family").
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ATTENTION_LAYOUTS": "layouts", "MLP_LAYOUTS": "layouts", "AttentionLayout": "layouts", "MLPLayout": "layouts",
    "Part": "layouts", "BlockAnatomy": "description", "ChannelGroup": "description", "ModelAnatomy": "description",
    "Slice": "description", "describe": "channels", "projection_base": "projections",
    "find_stacks": "stacks", "replace_submodule": "modules",
    "is_supported_linear": "linear", "linear_features": "linear", "weight_is_transposed": "linear",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_sft.anatomy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lightning_sft.anatomy.{_EXPORTS[name]}"), name)
