"""Contextual sparsity for fine-tuning (SparseLoRA): channel estimators, their cache, per-layer
schedules, FLOPs accounting and the sparse execution of the blocks ``lightning_sft.anatomy``
describes. Pure torch; the Lightning wiring lives in ``lightning_sft.callbacks``."""

from lightning_sft.sparsity.blocks import (
    AttentionIndices,
    Block,
    GatedMLPBlock,
    MLPBlock,
    QKBlock,
    VBlock,
    attention_indices,
    expand_kv_channels,
)
from lightning_sft.sparsity.estimators import (
    AllChannels,
    ChannelEstimator,
    NormEstimator,
    OracleEstimator,
    RandomEstimator,
    SVDEstimator,
    available_strategies,
    build_estimator,
    get_strategy,
    recall,
    register_strategy,
)
from lightning_sft.sparsity.schedule import (
    PRESETS,
    SparsityPreset,
    dense_warmup_steps,
    is_dense_step,
    kept_channels,
    preset,
    reference_layer,
    resolve_layer_sparsity,
)
from lightning_sft.sparsity.sparse_blocks import SparseBlock
from lightning_sft.sparsity.sparse_flops import SparseFlops, attention_projection_flops, mlp_flops
from lightning_sft.sparsity.sparsify import desparsify, kept_counts, sparse_blocks, sparsify
from lightning_sft.sparsity.state import SparsityState
from lightning_sft.sparsity.svd_cache import LowRankFactors, StaleCacheError, SVDCache, svd_factors, whitened_factors

__all__ = [
    "PRESETS",
    "AllChannels",
    "AttentionIndices",
    "Block",
    "ChannelEstimator",
    "GatedMLPBlock",
    "LowRankFactors",
    "MLPBlock",
    "NormEstimator",
    "OracleEstimator",
    "QKBlock",
    "RandomEstimator",
    "SVDCache",
    "SVDEstimator",
    "SparseBlock",
    "SparseFlops",
    "SparsityPreset",
    "SparsityState",
    "StaleCacheError",
    "VBlock",
    "attention_indices",
    "attention_projection_flops",
    "available_strategies",
    "build_estimator",
    "dense_warmup_steps",
    "desparsify",
    "expand_kv_channels",
    "get_strategy",
    "is_dense_step",
    "kept_channels",
    "kept_counts",
    "mlp_flops",
    "preset",
    "recall",
    "reference_layer",
    "register_strategy",
    "resolve_layer_sparsity",
    "sparse_blocks",
    "sparsify",
    "svd_factors",
    "whitened_factors",
]
