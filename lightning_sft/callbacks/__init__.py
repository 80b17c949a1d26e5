"""Lightning callbacks: thin wiring of the pure logic into the Trainer."""

from lightning_sft.callbacks.contextual_sparsity import ContextualSparsity
from lightning_sft.callbacks.efficiency import EfficiencyMonitor
from lightning_sft.callbacks.layer_dropout import LayerDropout
from lightning_sft.callbacks.lora import LoRA
from lightning_sft.callbacks.rank_search import AdaptiveRankSearch
from lightning_sft.callbacks.sparse_finetuning import SparseFineTuning

__all__ = ["AdaptiveRankSearch", "ContextualSparsity", "EfficiencyMonitor", "LayerDropout", "LoRA", "SparseFineTuning"]
