"""Ready-made LightningModules for the CLI."""

from lightning_sft.modules.causal_lm import PRESETS, CausalLM

__all__ = ["PRESETS", "CausalLM"]
