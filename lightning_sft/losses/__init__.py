"""Losses computed without materialising what they are computed from: the cross-entropy of a linear head
chunk by chunk (``linear_cross_entropy``): pure torch, or Liger-Kernel's fused kernel on CUDA when it is installed
(``losses.liger``); the ``FusedCrossEntropy`` callback applies it to a Hugging Face causal LM's own loss."""

from lightning_sft.losses.linear_cross_entropy import default_chunk, linear_cross_entropy

__all__ = ["default_chunk", "linear_cross_entropy"]
