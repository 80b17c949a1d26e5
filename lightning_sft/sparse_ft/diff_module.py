"""Sparse diffs and modules: writing a trained module's sparse deltas (``save_diff``) or its LoRA
adapters (``export_lora_diff``) as a diff file, and adding a diff file to a base model in place or
taking it back out (``apply_diff``, ``revert_diff``).

Every check runs before the first write: a diff for another base, a diff applied twice, or a
revert from a model without the diff are refused with the model untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.adapters.peft_format import peft_root
from lightning_sft.fingerprint import base_parameters, fingerprint_tensors, gathered_sample
from lightning_sft.sharding import first_rank_writes, has_sharded_parameters, unsharded
from lightning_sft.sparse_ft.delta_layer import sparse_delta_layers
from lightning_sft.sparse_ft.diff import DiffError, SparseDiff, bit_patterns, dtype_name, entry_digest, make_diff
from lightning_sft.sparse_ft.diff_file import read_diff, write_diff
from lightning_sft.sparse_ft.selection import entry_count, top_entries, validate_density


def save_diff(module: nn.Module, path: str | os.PathLike) -> Path:
    """Write the sparse deltas of ``module`` (trained by ``SparseFineTuning``) as a diff file.

    Names are those of the base model's own parameters (inside a LightningModule, relative to the
    Hugging Face model it holds), so the diff applies to the plain base model. A sharded module (FSDP2,
    ZeRO-3) is gathered one layer at a time and written by rank 0: call this on every rank then.
    """
    root, _ = peft_root(module)
    layers = sparse_delta_layers(root)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no sparse deltas to save. Add the `SparseFineTuning` callback.")
    base = base_parameters(root)
    names = {id(param): name for name, param in base.items()}
    updates, entries = {}, {}
    for layer in layers.values():
        name = names[id(layer.base_layer.weight)]
        with unsharded(layer):
            indices = layer.delta_indices[torch.argsort(layer.delta_indices)]
            updates[name] = (indices, layer.tuned_weight().reshape(-1)[indices])
            entries[name] = layer.base_layer.weight.detach().reshape(-1)[indices]
    selections = sorted({layer.selection for layer in layers.values()})
    dtypes = sorted({dtype_name(layer.base_layer.weight.dtype) for layer in layers.values()})
    info = {"source": "sparse-finetuning", "selection": ",".join(selections), "dtype": ",".join(dtypes)}
    diff = make_diff({name: gathered_sample(param) for name, param in base.items()}, updates, info, entries)
    with first_rank_writes(has_sharded_parameters(root)) as writes:
        if writes:
            write_diff(diff, path)
    return Path(path)


def export_lora_diff(module: nn.Module, path: str | os.PathLike, density: float | None = None) -> Path:
    """Write ``module``'s (unmerged) LoRA adapters as a sparse diff of the merged weights.

    With ``density=None`` the diff holds every entry the merge changes, and applying it equals
    ``merge_adapter`` bit for bit. A ``density`` keeps only that fraction of each weight's largest
    changes (as LT-SFT does with a full fine-tune): smaller, approximate; the fraction of the update's
    squared norm kept is recorded as ``energy_kept``.
    """
    if density is not None:
        validate_density(density)
    root, _ = peft_root(module)
    layers = {name: layer for name, layer in root.named_modules() if isinstance(layer, LoRALinear)}
    if not layers:
        raise ValueError(f"{type(module).__name__} has no LoRA adapters to export. Add the `LoRA` callback first.")
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("The adapters are merged into the base weights; call `unmerge_adapter` first.")
    base = base_parameters(root)
    names = {id(param): name for name, param in base.items()}
    updates, kept, total = {}, 0.0, 0.0
    with torch.no_grad():
        for layer in layers.values():
            weight = layer.base_layer.weight.reshape(-1)
            tuned = weight + layer.delta_weight().reshape(-1)  # what merge() computes
            change = (tuned - weight).float()
            if density is None:
                indices = torch.nonzero(bit_patterns(tuned) != bit_patterns(weight)).reshape(-1)
            else:
                indices = top_entries(change.abs(), entry_count(weight.numel(), density))
            kept += float(change[indices].square().sum())
            total += float(change.square().sum())
            updates[names[id(layer.base_layer.weight)]] = (indices, tuned[indices])
    dtypes = sorted({dtype_name(layer.base_layer.weight.dtype) for layer in layers.values()})
    info = {
        "source": "lora", "selection": "lora-merged" if density is None else "lora-top-magnitude",
        "dtype": ",".join(dtypes), "energy_kept": kept / total if total else 1.0,
    }
    return write_diff(make_diff(base, updates, info), path)


def apply_diff(module: nn.Module, path: str | os.PathLike, verify_base: bool = True) -> SparseDiff:
    """Add the diff at ``path`` to ``module``'s base weights in place.

    Every check runs before the first write, so a refused diff leaves ``module`` untouched:
    tensor names and shapes, dtypes, the base fingerprint and the exact entries the diff changes
    (which also refuses applying it twice). ``verify_base=False`` skips the base checks, to apply a
    diff to another base on purpose; its results are then plain ``base + delta``.
    """
    return _change(module, read_diff(path), forward=True, verify=verify_base)


def revert_diff(module: nn.Module, path: str | os.PathLike, verify_base: bool = True) -> SparseDiff:
    """Subtract the diff at ``path`` from ``module`` in place: after ``apply_diff`` this restores the
    base bit for bit. Refused, with ``module`` untouched, unless ``module`` is the base with this diff applied."""
    return _change(module, read_diff(path), forward=False, verify=verify_base)


def _change(module: nn.Module, diff: SparseDiff, forward: bool, verify: bool) -> SparseDiff:
    root, _ = peft_root(module)
    params = base_parameters(root)
    _check_layout(root, params, diff)
    current = {
        name: params[name].detach().reshape(-1)[t.indices.to(params[name].device)] for name, t in diff.tensors.items()
    }
    if verify:
        _check_state(params, diff, current, forward)
    new_entries = {}
    for name, t in diff.tensors.items():
        if verify:
            new_entries[name] = t.tuned(current[name]) if forward else t.reverted(current[name])
        else:
            values = t.values.to(current[name].device)
            new_entries[name] = current[name] + values if forward else current[name] - values
    with torch.no_grad():
        for name, entries in new_entries.items():
            params[name].view(-1)[diff.tensors[name].indices.to(entries.device)] = entries
    return diff


def _check_layout(root: nn.Module, params: Mapping[str, torch.Tensor], diff: SparseDiff) -> None:
    missing = [name for name in diff.tensors if name not in params]
    if missing:
        raise DiffError(
            f"The diff changes {missing[0]!r}, which {type(root).__name__} does not have"
            f" ({len(missing)} such tensors): it was made for another architecture."
        )
    for name, t in diff.tensors.items():
        param = params[name]
        if tuple(param.shape) != t.shape:
            raise DiffError(
                f"Shape mismatch for {name!r}: the diff was made for {t.shape}, the model has {tuple(param.shape)}."
            )
        if param.dtype != t.values.dtype:
            raise DiffError(
                f"{name!r} is {param.dtype} but the diff holds {t.values.dtype} deltas; load the model in"
                f" {t.values.dtype} (e.g. torch_dtype={str(t.values.dtype).removeprefix('torch.')!r})."
            )
        if not param.is_contiguous():
            raise DiffError(f"{name!r} is not contiguous; call .contiguous() on the model's weights first.")


def _check_state(
    params: Mapping[str, torch.Tensor], diff: SparseDiff, current: Mapping[str, torch.Tensor], forward: bool
) -> None:
    """Refuse unless the model is the diff's base (apply) or that base with the diff applied (revert);
    ``current`` holds the model's values at the diff's entries."""
    fingerprint = fingerprint_tensors(params.items())
    expected = diff.base_fingerprint if forward else diff.tuned_fingerprint
    digests = {name: entry_digest(entries) for name, entries in current.items()}
    if forward and all(digests[n] == t.tuned_digest for n, t in diff.tensors.items()) and (
        fingerprint == diff.tuned_fingerprint
    ):
        raise DiffError("This diff is already applied to the model; revert it first, or load a fresh base.")
    if not forward and all(digests[n] == t.base_digest for n, t in diff.tensors.items()) and (
        fingerprint == diff.base_fingerprint
    ):
        raise DiffError("This diff is not applied to the model (it holds the base weights); there is nothing to revert.")
    changed = [n for n, t in diff.tensors.items() if digests[n] != (t.base_digest if forward else t.tuned_digest)]
    if fingerprint != expected or changed:
        what = "the base it was made for" if forward else "the base with this diff applied"
        detail = f" ({changed[0]!r} differs at the diff's entries)" if changed else " (weight fingerprint mismatch)"
        raise DiffError(
            f"The model is not {what}{detail}. Load the base the diff was made for, or pass verify_base=False"
            " if you mean to apply it to another base."
        )
