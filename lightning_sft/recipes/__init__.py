"""Memory-saving recipes: activation checkpointing per block, the attention kernel of Hugging Face
models, 8-bit optimizer states, a causal LM's loss without its logits (``fused_loss``), and activations
kept in host memory between forward and backward (``offload``). Pure logic (no Lightning); the callbacks in
``lightning_sft.callbacks`` switch them on for a fit. See ``docs/memory_recipes.md``."""

from lightning_sft.recipes.attention import IMPLEMENTATIONS, set_attention_implementation
from lightning_sft.recipes.checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from lightning_sft.recipes.offload import offload_activations
from lightning_sft.recipes.optimizers import eight_bit_optimizer, rebind_scheduler

__all__ = [
    "IMPLEMENTATIONS",
    "disable_gradient_checkpointing",
    "eight_bit_optimizer",
    "offload_activations",
    "enable_gradient_checkpointing",
    "rebind_scheduler",
    "set_attention_implementation",
]
