"""lightning-sft: PyTorch Lightning callbacks that make fine-tuning large language models cheaper."""

from lightning_sft.adapters import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    load_adapter,
    load_from_checkpoint,
    lora_layers,
    merge_adapter,
    quantize_base,
    save_adapter,
    unmerge_adapter,
)
from lightning_sft.callbacks import AdaptiveRankSearch, ContextualSparsity, EfficiencyMonitor, LayerDropout, LoRA, SparseFineTuning
from lightning_sft.callbacks import AttentionImplementation, EightBitOptimizer, GradientCheckpointing
from lightning_sft.recipes import (
    disable_gradient_checkpointing,
    eight_bit_optimizer,
    enable_gradient_checkpointing,
    set_attention_implementation,
)

from lightning_sft.sparse_ft import apply_diff, export_lora_diff, read_diff, revert_diff, save_diff

__version__ = "0.1.0"

__all__ = [
    "AdaptiveRankSearch",
    "AttentionImplementation",
    "ContextualSparsity",
    "EfficiencyMonitor",
    "EightBitOptimizer",
    "GradientCheckpointing",
    "LayerDropout",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "SparseFineTuning",
    "apply_diff",
    "disable_gradient_checkpointing",
    "eight_bit_optimizer",
    "enable_gradient_checkpointing",
    "export_lora_diff",
    "inject_lora",
    "load_adapter",
    "load_from_checkpoint",
    "lora_layers",
    "merge_adapter",
    "quantize_base",
    "read_diff",
    "revert_diff",
    "save_adapter",
    "save_diff",
    "set_attention_implementation",
    "unmerge_adapter",
]
