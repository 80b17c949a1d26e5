"""lightning-sft: PyTorch Lightning callbacks that make fine-tuning large language models cheaper.

The names below are loaded on first use, so importing a pure subpackage (``lightning_sft.memory``,
``lightning_sft.layer_dropout.schedules``, ...) does not load Lightning. See docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(
        ("ActivationOffloading", "AdaptiveRankSearch", "AttentionImplementation", "ContextualSparsity", "EfficiencyMonitor",
         "EightBitOptimizer", "FusedCrossEntropy", "GradientCheckpointing", "LayerDropout", "LoRA", "SparseFineTuning"),
        "lightning_sft.callbacks",
    ),
    **dict.fromkeys(
        ("LoRAConfig", "LoRALinear", "inject_lora", "load_adapter", "load_from_checkpoint", "lora_layers",
         "merge_adapter", "quantize_base", "save_adapter", "unmerge_adapter"),
        "lightning_sft.adapters",
    ),
    **dict.fromkeys(
        ("disable_gradient_checkpointing", "eight_bit_optimizer", "enable_gradient_checkpointing",
         "offload_activations", "set_attention_implementation"),
        "lightning_sft.recipes",
    ),
    "linear_cross_entropy": "lightning_sft.losses",
    **dict.fromkeys(("apply_diff", "export_lora_diff", "read_diff", "revert_diff", "save_diff"), "lightning_sft.sparse_ft"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_sft' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
