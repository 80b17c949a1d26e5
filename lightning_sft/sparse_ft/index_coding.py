"""Compact integer streams for diff files: LEB128 varints, sorted indices as gaps, signed residuals.

At 1% density the gaps between sorted flat indices average ~100, so most take one byte and the rest
two: about 1.1-1.3 bytes per index where int32 would take 4. Signed values (the exact-revert
residuals, a few units in the last place) are zigzag-coded first, so small magnitudes take one
byte. Encoding and decoding are vectorised.
"""

from __future__ import annotations

import numpy as np
import torch

_PAYLOAD_BITS = 7
_MAX_BYTES = 10  # ceil(64 / 7): enough for any 64-bit value


def encode_varints(values: np.ndarray) -> torch.Tensor:
    """uint8 LEB128 stream of unsigned 64-bit ``values``."""
    values = np.asarray(values, dtype=np.uint64)
    widths = np.ones(values.size, dtype=np.int64)
    for shift in range(_PAYLOAD_BITS, 64, _PAYLOAD_BITS):
        widths += values >= (np.uint64(1) << np.uint64(shift))
    starts = np.cumsum(widths) - widths
    stream = np.empty(int(widths.sum()), dtype=np.uint8)
    for byte in range(int(widths.max(initial=0))):
        has = widths > byte
        payload = (values[has] >> np.uint64(_PAYLOAD_BITS * byte)) & np.uint64(0x7F)
        more = (widths[has] > byte + 1).astype(np.uint64) << np.uint64(7)
        stream[starts[has] + byte] = (payload | more).astype(np.uint8)
    return torch.from_numpy(stream)


def decode_varints(stream: torch.Tensor, count: int) -> np.ndarray:
    """The ``count`` uint64 values of a LEB128 stream; ValueError unless it holds exactly that many."""
    if stream.dim() != 1:
        raise ValueError(f"a varint stream is one-dimensional, got shape {tuple(stream.shape)}.")
    data = stream.detach().to(device="cpu", dtype=torch.uint8).numpy().astype(np.uint64)
    last = (data & np.uint64(0x80)) == 0
    if int(last.sum()) != count or (data.size and not last[-1]):
        raise ValueError(f"the stream holds {int(last.sum())} complete values, expected {count}.")
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    owner = np.cumsum(last) - last  # which value each byte belongs to
    starts = np.flatnonzero(np.r_[True, last[:-1]])
    position = np.arange(data.size) - starts[owner]
    if position.max() >= _MAX_BYTES:
        raise ValueError("the stream has a value longer than 64 bits.")
    parts = (data & np.uint64(0x7F)) << (np.uint64(_PAYLOAD_BITS) * position.astype(np.uint64))
    values = np.zeros(count, dtype=np.uint64)
    np.add.at(values, owner, parts)
    return values


def encode_indices(indices: torch.Tensor) -> torch.Tensor:
    """Stream of the gaps of strictly increasing, non-negative ``indices`` (the first gap is the first index)."""
    values = indices.detach().to(device="cpu", dtype=torch.int64).numpy()
    if values.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {tuple(indices.shape)}.")
    gaps = np.diff(values, prepend=np.int64(-1)) - 1  # the first index i is stored as gap i (from -1)
    if values.size and (values[0] < 0 or (gaps < 0).any()):
        raise ValueError("indices must be non-negative and strictly increasing (sort and deduplicate them first).")
    return encode_varints(gaps.astype(np.uint64))


def decode_indices(stream: torch.Tensor, count: int, limit: int) -> torch.Tensor:
    """The ``count`` int64 indices encoded in ``stream``; raises ValueError unless they are exactly
    ``count`` strictly increasing values below ``limit`` (a corrupted stream cannot pass)."""
    gaps = decode_varints(stream, count)
    if count and gaps.max() >= np.uint64(limit):
        raise ValueError(f"the index stream points past the end of a tensor of {limit} entries.")
    indices = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if count and indices[-1] >= limit:
        raise ValueError(f"the index stream points past the end of a tensor of {limit} entries.")
    return torch.from_numpy(indices)


def encode_signed(values: torch.Tensor) -> torch.Tensor:
    """Stream of int64 ``values``, zigzag-coded (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...) so small magnitudes are short."""
    signed = values.detach().to(device="cpu", dtype=torch.int64).numpy()
    return encode_varints(((signed << np.int64(1)) ^ (signed >> np.int64(63))).view(np.uint64))


def decode_signed(stream: torch.Tensor, count: int) -> torch.Tensor:
    zigzag = decode_varints(stream, count)
    return torch.from_numpy(((zigzag >> np.uint64(1)) ^ (np.uint64(0) - (zigzag & np.uint64(1)))).view(np.int64))
