"""Sparse diff files: a fine-tune stored as the few entries it changed, applied to and rolled back
from the base model in place.

One safetensors file holding, for all changed tensors together (in the order of their names):

- ``indices``: each tensor's changed flat positions, sorted, as LEB128 varint gaps (uint8);
- ``values.<dtype>``: the deltas in the weight's dtype, chosen so that ``base + delta`` is the tuned
  value bit for bit;
- ``fixup_mask`` / ``fixup_residuals``: where floating-point ``tuned - delta`` is not the base (a
  delta larger than its weight rounds the weight's low bits away), a bit per entry, and for those
  entries the distance to the base in units in the last place (zigzag varints, almost always one
  byte), so revert is exact too.

The metadata (JSON under ``lightning_sft.sparse_diff``) lists each tensor's name, shape and counts,
the fingerprints of the base and the tuned model, digests of each tensor's changed entries before
and after, and a digest of every stored byte: a diff for another base, a diff applied twice, and
a corrupted or truncated file are all refused before anything changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.adapters.peft_format import peft_root
from lightning_sft.atomic_io import atomic_path
from lightning_sft.fingerprint import TensorSample, base_parameters, fingerprint_tensors, gathered_sample
from lightning_sft.sharding import first_rank_writes, has_sharded_parameters, unsharded
from lightning_sft.sparse_ft.delta_layer import sparse_delta_layers
from lightning_sft.sparse_ft.index_coding import decode_indices, decode_signed, encode_indices, encode_signed
from lightning_sft.sparse_ft.selection import entry_count, top_entries, validate_density

METADATA_KEY = "lightning_sft.sparse_diff"
FORMAT_VERSION = 1
# Header fields write_diff fills in; the rest is the caller's information (source, selection, ...).
_RESERVED = ("format_version", "base_fingerprint", "tuned_fingerprint", "nnz", "density", "tensor_columns", "tensors",
             "content_sha256")
# One row per tensor in the metadata (rows rather than objects: the keys would repeat for every tensor).
_COLUMNS = ("name", "shape", "dtype", "nnz", "index_bytes", "fixups", "residual_bytes", "base_digest", "tuned_digest")
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_DTYPES = {_dtype_name(dtype): dtype for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}
_DIGEST_CHARS = 16  # per-tensor digests: 64 bits tell a changed tensor apart; the file digest is full length


class DiffError(ValueError):
    """A diff that cannot be read, or cannot be applied to (or reverted from) this model."""


@dataclass(frozen=True)
class TensorDiff:
    """The changed entries of one tensor (see the module docstring for the meaning of each part)."""

    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor
    fixup_positions: torch.Tensor
    fixup_residuals: torch.Tensor
    base_digest: str
    tuned_digest: str

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def tuned(self, base_entries: torch.Tensor) -> torch.Tensor:
        return base_entries + self.values.to(base_entries.device)

    def reverted(self, tuned_entries: torch.Tensor) -> torch.Tensor:
        old = tuned_entries - self.values.to(tuned_entries.device)
        positions = self.fixup_positions.to(old.device)
        bits = _bits(old)
        bits[positions] = (bits[positions].long() + self.fixup_residuals.to(old.device)).to(bits.dtype)
        return old


@dataclass(frozen=True)
class SparseDiff:
    """A whole diff: per-tensor changes plus what identifies the base it belongs to."""

    tensors: dict[str, TensorDiff]
    base_fingerprint: str
    tuned_fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        return sum(t.indices.numel() for t in self.tensors.values())

    @property
    def density(self) -> float:
        """Changed entries over the entries of the tensors the diff touches."""
        return self.nnz / max(1, sum(t.numel for t in self.tensors.values()))

    @property
    def ideal_bytes(self) -> int:
        """What the values alone take: the floor for any format that stores them uncompressed."""
        return sum(t.values.numel() * t.values.element_size() for t in self.tensors.values())


def _digest(entries: torch.Tensor) -> str:
    data = entries.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:_DIGEST_CHARS]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so that -0.0 != 0.0 and NaN == NaN where it is the same NaN."""
    return tensor.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[tensor.element_size()])


def _exact_deltas(name: str, base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """Deltas with ``base + delta == tuned`` bit for bit. ``tuned - base`` rounded is that in
    round-to-nearest arithmetic except for signed zeros, which the neighbouring candidates cover."""
    deltas = tuned - base
    for candidate in (-deltas, torch.nextafter(deltas, torch.full_like(deltas, torch.inf)),
                      torch.nextafter(deltas, torch.full_like(deltas, -torch.inf))):
        wrong = _bits(base + deltas) != _bits(tuned)
        if not wrong.any():
            return deltas
        deltas = torch.where(wrong, candidate, deltas)
    if (_bits(base + deltas) != _bits(tuned)).any():
        raise DiffError(f"{name!r}: some tuned values are not reachable by adding a {tuned.dtype} delta to the base.")
    return deltas


def make_diff(
    base: Mapping[str, torch.Tensor | TensorSample],
    updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    info: dict[str, Any],
    base_entries: Mapping[str, torch.Tensor] | None = None,
) -> SparseDiff:
    """The diff taking the ``base`` tensors (all of the model's, by name) to the tuned entries
    ``updates[name] = (sorted flat indices, tuned values in the tensor's dtype)``.

    ``base_entries[name]`` gives the base values at those indices where ``base`` holds only a sample
    of the tensor (a sharded model); otherwise they are read from ``base``.
    """
    tensors, patches = {}, {}
    for name, (indices, tuned) in sorted(updates.items()):
        weight = base[name]
        indices = indices.detach().to("cpu", torch.int64)
        tuned = tuned.detach().to("cpu", weight.dtype)
        if not torch.isfinite(tuned).all():
            raise DiffError(f"The tuned values of {name!r} are not all finite (the training diverged); nothing was saved.")
        if base_entries is not None and name in base_entries:
            entries = base_entries[name].detach().to("cpu")
        else:
            assert isinstance(weight, torch.Tensor)
            entries = weight.detach().reshape(-1)[indices.to(weight.device)].to("cpu")
        values = _exact_deltas(name, entries, tuned)
        approximate = tuned - values
        fixups = torch.nonzero(_bits(approximate) != _bits(entries)).reshape(-1)
        # Bit patterns of same-signed floats are ordered like the floats: the difference counts units
        # in the last place. Integer arithmetic wraps, so adding it back is exact in every case.
        residuals = _bits(entries)[fixups].long() - _bits(approximate)[fixups].long()
        tensors[name] = TensorDiff(
            shape=tuple(weight.shape), indices=indices, values=values, fixup_positions=fixups,
            fixup_residuals=residuals, base_digest=_digest(entries), tuned_digest=_digest(tuned),
        )
        patches[name] = (indices, tuned)
    return SparseDiff(tensors, fingerprint_tensors(base.items()), fingerprint_tensors(base.items(), patches), info)


# -- files --------------------------------------------------------------------------------------------


def write_diff(diff: SparseDiff, path: str | os.PathLike) -> Path:
    """Write ``diff`` to ``path`` atomically (an interrupted write leaves any previous file intact)."""
    parts: dict[str, list[torch.Tensor]] = {}
    records = []
    for name, t in diff.tensors.items():
        dtype = _dtype_name(t.values.dtype)
        index_stream, residual_stream = encode_indices(t.indices), encode_signed(t.fixup_residuals)
        mask = torch.zeros(t.indices.numel(), dtype=torch.bool)
        mask[t.fixup_positions] = True
        packed = torch.from_numpy(np.packbits(mask.numpy()))
        for key, tensor in (("indices", index_stream), (f"values.{dtype}", t.values),
                            ("fixup_mask", packed), ("fixup_residuals", residual_stream)):
            parts.setdefault(key, []).append(tensor)
        records.append([
            name, list(t.shape), dtype, t.indices.numel(), index_stream.numel(), t.fixup_positions.numel(),
            residual_stream.numel(), t.base_digest, t.tuned_digest,
        ])
    stored = {key: torch.cat(tensors).contiguous() for key, tensors in parts.items()}
    header = {
        "format_version": FORMAT_VERSION, "base_fingerprint": diff.base_fingerprint,
        "tuned_fingerprint": diff.tuned_fingerprint, "nnz": diff.nnz, "density": diff.density,
        "tensor_columns": list(_COLUMNS), "tensors": records, "content_sha256": _content_digest(stored), **diff.info,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(stored, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(header, separators=(",", ":"))})
    return path


def _content_digest(stored: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(stored):
        digest.update(key.encode())
        digest.update(stored[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_diff(path: str | os.PathLike) -> SparseDiff:
    """Read and check a diff file; raises ``DiffError`` for anything but an intact diff."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the .safetensors file written by save_diff.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            stored = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for a bad header or short file
        raise DiffError(f"{path} is corrupted or truncated: {error}") from None
    if raw is None:
        raise DiffError(f"{path} is a safetensors file but not a sparse diff (no {METADATA_KEY!r} metadata).")
    header = _parse_header(raw, path)
    if header.get("content_sha256") != _content_digest(stored):
        raise DiffError(f"{path} is corrupted: its stored bytes do not match the digest written with them.")
    try:
        tensors = _split(header["tensors"], stored)
    except (ValueError, KeyError, TypeError) as error:
        raise DiffError(f"{path} is corrupted: {error}") from None
    info = {k: v for k, v in header.items() if k not in _RESERVED}
    return SparseDiff(tensors, header["base_fingerprint"], header["tuned_fingerprint"], info)


def _parse_header(raw: str, path: Path) -> dict[str, Any]:
    """The metadata, with ``tensors`` as one dict per tensor; DiffError if it is not version 1's layout."""
    try:
        header = json.loads(raw)
        version = header["format_version"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DiffError(f"{path} is corrupted: its diff metadata does not parse.") from None
    if version != FORMAT_VERSION:
        raise DiffError(f"{path} is format version {version}; this lightning-sft reads version {FORMAT_VERSION}.")
    try:
        if header["tensor_columns"] != list(_COLUMNS):
            raise ValueError
        header["tensors"] = [dict(zip(_COLUMNS, row, strict=True)) for row in header["tensors"]]
    except (KeyError, TypeError, ValueError):
        raise DiffError(f"{path} is corrupted: its table of tensors does not parse.") from None
    return header


def _split(records: list[dict[str, Any]], stored: Mapping[str, torch.Tensor]) -> dict[str, TensorDiff]:
    """Cut the concatenated parts back into per-tensor diffs, checking every count against the metadata."""
    offsets = dict.fromkeys(stored, 0)

    def take(key: str, count: int) -> torch.Tensor:
        if key not in stored:
            raise KeyError(f"the part {key!r} is missing")
        start = offsets[key]
        if start + count > stored[key].numel():
            raise ValueError(f"the part {key!r} is shorter than its metadata says")
        offsets[key] = start + count
        return stored[key][start:start + count]

    tensors = {}
    for record in records:
        name, dtype = str(record["name"]), str(record["dtype"])
        if dtype not in _DTYPES or stored.get(f"values.{dtype}", torch.empty(0, dtype=_DTYPES[dtype])).dtype != _DTYPES[dtype]:
            raise ValueError(f"{name!r} has values of an unknown or mismatched dtype {dtype!r}")
        shape = tuple(int(size) for size in record["shape"])
        nnz, fixups = int(record["nnz"]), int(record["fixups"])
        mask = np.unpackbits(take("fixup_mask", (nnz + 7) // 8).numpy(), count=nnz).astype(bool)
        if int(mask.sum()) != fixups:
            raise ValueError(f"{name!r} flags {int(mask.sum())} fixups, its metadata says {fixups}")
        tensors[name] = TensorDiff(
            shape=shape,
            indices=decode_indices(take("indices", int(record["index_bytes"])), nnz, int(torch.Size(shape).numel())),
            values=take(f"values.{dtype}", nnz),
            fixup_positions=torch.from_numpy(np.flatnonzero(mask)),
            fixup_residuals=decode_signed(take("fixup_residuals", int(record["residual_bytes"])), fixups),
            base_digest=str(record["base_digest"]), tuned_digest=str(record["tuned_digest"]),
        )
    leftover = [key for key, used in offsets.items() if used != stored[key].numel()]
    if leftover:
        raise ValueError(f"the part {leftover[0]!r} holds more than its metadata lists")
    return tensors


# -- modules ------------------------------------------------------------------------------------------


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
    dtypes = sorted({_dtype_name(layer.base_layer.weight.dtype) for layer in layers.values()})
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
                indices = torch.nonzero(_bits(tuned) != _bits(weight)).reshape(-1)
            else:
                indices = top_entries(change.abs(), entry_count(weight.numel(), density))
            kept += float(change[indices].square().sum())
            total += float(change.square().sum())
            updates[names[id(layer.base_layer.weight)]] = (indices, tuned[indices])
    dtypes = sorted({_dtype_name(layer.base_layer.weight.dtype) for layer in layers.values()})
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
    digests = {name: _digest(entries) for name, entries in current.items()}
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
