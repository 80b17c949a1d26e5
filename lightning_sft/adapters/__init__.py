"""LoRA adapters: injection, persistence in peft's layout, merging."""

import logging


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
from lightning_sft.adapters.quantization import (
    dequantize_cols,
    dequantize_rows,
    dequantize_weight,
    is_quantized,
    packed_weight,
    quantize_base,
    quantized_bytes,
)

# bitsandbytes' CPU backend logs, when imported, that an optional kernel from the Hugging Face hub (package
# `kernels`) is missing, then uses its own CPU kernel: the one quantization._cpu_kernel_agrees checks. The line
# only alarms users (offline it cannot be had), so it is dropped; every other bitsandbytes message stays.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "adapter_structure",
    "base_fingerprint",
    "dequantize_cols",
    "dequantize_rows",
    "dequantize_weight",
    "inject_lora",
    "is_quantized",
    "load_adapter",
    "load_from_checkpoint",
    "lora_layers",
    "merge_adapter",
    "packed_weight",
    "quantize_base",
    "quantized_bytes",
    "save_adapter",
    "unmerge_adapter",
]
