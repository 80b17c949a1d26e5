"""A sparse diff in memory: the few entries a fine-tune changed, per tensor, and what identifies the
base it belongs to (``SparseDiff``, ``TensorDiff``, built by ``make_diff``).

Each delta is chosen so that ``base + delta`` is the tuned value bit for bit; where floating-point
``tuned - delta`` is not the base (a delta larger than its weight rounds the weight's low bits
away), the diff keeps those entries' distance to the base in units in the last place, so revert is
exact too. The per-tensor digests of the changed entries before and after let a diff refuse a
model it does not belong to. The file format is ``diff_file``; applying to modules is
``diff_module``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_sft.fingerprint import TensorSample, fingerprint_tensors

_DIGEST_CHARS = 16  # per-tensor digests: 64 bits tell a changed tensor apart; the file digest is full length


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: how diffs name a dtype (file parts, metadata)."""
    return str(dtype).removeprefix("torch.")


class DiffError(ValueError):
    """A diff that cannot be read, or cannot be applied to (or reverted from) this model."""


@dataclass(frozen=True)
class TensorDiff:
    """The changed entries of one tensor: sorted flat ``indices``, their ``values`` (deltas), and the
    ``fixup_positions`` (into ``indices``) with ``fixup_residuals`` that make revert exact."""

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
        bits = bit_patterns(old)
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


def entry_digest(entries: torch.Tensor) -> str:
    """A short digest of ``entries``' bytes: tells a tensor's changed entries apart before and after."""
    data = entries.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:_DIGEST_CHARS]


def bit_patterns(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so that -0.0 != 0.0 and NaN == NaN where it is the same NaN."""
    return tensor.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[tensor.element_size()])


def _exact_deltas(name: str, base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """Deltas with ``base + delta == tuned`` bit for bit. ``tuned - base`` rounded is that in
    round-to-nearest arithmetic except for signed zeros, which the neighbouring candidates cover."""
    deltas = tuned - base
    for candidate in (-deltas, torch.nextafter(deltas, torch.full_like(deltas, torch.inf)),
                      torch.nextafter(deltas, torch.full_like(deltas, -torch.inf))):
        wrong = bit_patterns(base + deltas) != bit_patterns(tuned)
        if not wrong.any():
            return deltas
        deltas = torch.where(wrong, candidate, deltas)
    if (bit_patterns(base + deltas) != bit_patterns(tuned)).any():
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
        fixups = torch.nonzero(bit_patterns(approximate) != bit_patterns(entries)).reshape(-1)
        # Bit patterns of same-signed floats are ordered like the floats: the difference counts units
        # in the last place. Integer arithmetic wraps, so adding it back is exact in every case.
        residuals = bit_patterns(entries)[fixups].long() - bit_patterns(approximate)[fixups].long()
        tensors[name] = TensorDiff(
            shape=tuple(weight.shape), indices=indices, values=values, fixup_positions=fixups,
            fixup_residuals=residuals, base_digest=entry_digest(entries), tuned_digest=entry_digest(tuned),
        )
        patches[name] = (indices, tuned)
    return SparseDiff(tensors, fingerprint_tensors(base.items()), fingerprint_tensors(base.items(), patches), info)
