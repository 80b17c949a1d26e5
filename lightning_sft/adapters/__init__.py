"""LoRA adapters: injection, persistence in peft's layout, merging."""

from lightning_sft.adapters.checkpoint import load_from_checkpoint
from lightning_sft.adapters.injection import (
    LoRAConfig,
    adapter_structure,
    base_fingerprint,
    inject_lora,
    lora_layers,
    merge_adapter,
    unmerge_adapter,
)
from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.adapters.peft_format import load_adapter, save_adapter

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "adapter_structure",
    "base_fingerprint",
    "inject_lora",
    "load_adapter",
    "load_from_checkpoint",
    "lora_layers",
    "merge_adapter",
    "save_adapter",
    "unmerge_adapter",
]
