"""The sparse diff file: one safetensors file holding, for all changed tensors together (in the order
of their names):

- ``indices``: each tensor's changed flat positions, sorted, as LEB128 varint gaps (uint8);
- ``values.<dtype>``: the deltas in the weight's dtype;
- ``fixup_mask`` / ``fixup_residuals``: a bit per entry flagging where ``tuned - delta`` is not the
  base, and for those entries the distance to the base in units in the last place (zigzag
  varints, almost always one byte).

The metadata (JSON under ``lightning_sft.sparse_diff``) lists each tensor's name, shape and counts,
the fingerprints of the base and the tuned model, digests of each tensor's changed entries before
and after, and a digest of every stored byte: a corrupted or truncated file is refused on reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_sft.atomic_io import atomic_path
from lightning_sft.sparse_ft.diff import DiffError, SparseDiff, TensorDiff, dtype_name
from lightning_sft.sparse_ft.index_coding import decode_indices, decode_signed, encode_indices, encode_signed

METADATA_KEY = "lightning_sft.sparse_diff"
FORMAT_VERSION = 1
# Header fields write_diff fills in; the rest is the caller's information (source, selection, ...).
_RESERVED = ("format_version", "base_fingerprint", "tuned_fingerprint", "nnz", "density", "tensor_columns", "tensors",
             "content_sha256")
# One row per tensor in the metadata (rows rather than objects: the keys would repeat for every tensor).
_COLUMNS = ("name", "shape", "dtype", "nnz", "index_bytes", "fixups", "residual_bytes", "base_digest", "tuned_digest")
_DTYPES = {dtype_name(dtype): dtype for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


def write_diff(diff: SparseDiff, path: str | os.PathLike) -> Path:
    """Write ``diff`` to ``path`` atomically (an interrupted write leaves any previous file intact)."""
    parts: dict[str, list[torch.Tensor]] = {}
    records = []
    for name, t in diff.tensors.items():
        dtype = dtype_name(t.values.dtype)
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
