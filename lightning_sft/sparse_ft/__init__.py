"""Sparse fine-tuning: train a few chosen entries of the base weights, store them as a sparse diff."""

from lightning_sft.sparse_ft.delta_layer import SparseDeltaLinear, sparse_delta_layers
from lightning_sft.sparse_ft.diff import DiffError, SparseDiff
from lightning_sft.sparse_ft.diff_file import read_diff
from lightning_sft.sparse_ft.diff_module import apply_diff, export_lora_diff, revert_diff, save_diff

__all__ = [
    "DiffError",
    "SparseDeltaLinear",
    "SparseDiff",
    "apply_diff",
    "export_lora_diff",
    "read_diff",
    "revert_diff",
    "save_diff",
    "sparse_delta_layers",
]
