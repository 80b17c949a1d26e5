"""The one check of an index argument of the sliced products (dense or 4-bit): a 1-D int64 tensor on the
weight's device, in range, and (for the gather-GEMMs, which also scatter gradients) sorted and unique."""

from __future__ import annotations

import torch
from torch import Tensor


def check_indices(
    idx: object, limit: int, device: torch.device, name: str = "idx", values: bool = True, sorted_unique: bool = True
) -> None:
    """Raise ``ValueError`` naming the fix when ``idx`` is not a 1-D int64 tensor on ``device``; with ``values``
    also when an entry lies outside ``[0, limit)`` or (``sorted_unique``) the entries are not increasing.
    The value checks cost one device sync."""
    if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
        got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"{name} must be a 1-D int64 tensor, got {got}; use dtype=torch.long")
    if idx.device != device:
        raise ValueError(f"{name} on {idx.device}, but the weight is on {device}: pass {name}.to(weight.device)")
    if not values or idx.numel() == 0:
        return
    lo, hi = torch.aminmax(idx)
    out_of_range, unsorted = torch.stack([(lo < 0) | (hi >= limit), (idx[1:] <= idx[:-1]).any()]).tolist()
    if out_of_range:
        raise ValueError(f"{name} has values outside [0, {limit}): min {int(lo)}, max {int(hi)}")
    if unsorted and sorted_unique:
        raise ValueError(f"{name} must be sorted and unique: pass torch.unique({name}) (it sorts)")
