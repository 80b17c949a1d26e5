"""Lightning callbacks: thin wiring of the pure logic into the Trainer."""

from lightning_sft.callbacks.activation_offloading import ActivationOffloading
from lightning_sft.callbacks.attention import AttentionImplementation
from lightning_sft.callbacks.contextual_sparsity import ContextualSparsity
from lightning_sft.callbacks.efficiency import EfficiencyMonitor
from lightning_sft.callbacks.eight_bit_optimizer import EightBitOptimizer
from lightning_sft.callbacks.fused_cross_entropy import FusedCrossEntropy
from lightning_sft.callbacks.gradient_checkpointing import GradientCheckpointing
from lightning_sft.callbacks.layer_dropout import LayerDropout
from lightning_sft.callbacks.lora import LoRA
from lightning_sft.callbacks.rank_search import AdaptiveRankSearch
from lightning_sft.callbacks.sparse_finetuning import SparseFineTuning

__all__ = [
    "ActivationOffloading",
    "AdaptiveRankSearch",
    "AttentionImplementation",
    "ContextualSparsity",
    "EfficiencyMonitor",
    "EightBitOptimizer",
    "FusedCrossEntropy",
    "GradientCheckpointing",
    "LayerDropout",
    "LoRA",
    "SparseFineTuning",
]
