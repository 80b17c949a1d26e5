"""4-bit (NF4/FP4) weights as plain tensors, and decoding only the rows or columns a product keeps.

``Packed4bit`` describes a frozen ``(out, in)`` weight packed in 4 bits the way bitsandbytes stores
it (``Params4bit`` and its quant state; ``adapters.quantization.packed_weight`` builds one from a
layer), without referring to any bitsandbytes object: W flattened row-major, two 4-bit codes per
byte (even flat index in the high nibble), one scale (absmax) per ``blocksize`` consecutive flat
entries. The scales are fp32, or with double quantization uint8 codes of a 256-entry table times
one fp32 scale per ``nested_blocksize`` blocks, plus a global offset.

``decode`` gives the whole weight or only some rows / columns, bit for bit what
``bitsandbytes.functional.dequantize_4bit`` gives for them. ``kernels.dispatch.sparse_matmul``
takes a ``Packed4bit`` as its weight and decodes only the kept slice. Pure torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sft.kernels.indices import check_indices


def _problem(message: str) -> None:
    raise ValueError(f"Packed4bit: {message}")


@dataclass(frozen=True, eq=False)
class Packed4bit:
    """A frozen ``(out_features, in_features)`` weight packed in 4 bits; ``n = out_features * in_features``.

    - ``data``: ``(ceil(n / 2),)`` uint8, two codes per byte.
    - ``absmax``: ``(ceil(n / blocksize),)`` scales: fp32, or uint8 codes when ``nested_code`` is set.
    - ``code``: ``(16,)`` float, the value of each 4-bit code (bitsandbytes' ``quant_map``).
    - ``blocksize``: flat entries per scale.
    - ``shape``: ``(out_features, in_features)``, the logical shape.
    - ``dtype``: what ``decode`` returns (the dtype the weight was quantized from).
    - ``compute_dtype``: the dtype products run in; None: the activation's (``Linear4bit``'s rule).
    - double quantization: ``nested_code`` ``(256,)`` fp32 (the scale codes' values), ``nested_absmax``
      ``(ceil(len(absmax) / nested_blocksize),)`` fp32 and ``offset`` (a scalar fp32 tensor added to every scale).

    Checked on construction (shapes, dtypes, devices; no value is read). The tensors are the
    layer's own, not copies.
    """

    data: Tensor
    absmax: Tensor
    code: Tensor
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype
    compute_dtype: torch.dtype | None = None
    nested_code: Tensor | None = None
    nested_absmax: Tensor | None = None
    nested_blocksize: int = 256
    offset: Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or any(not isinstance(s, int) or s < 0 for s in self.shape):
            _problem(f"shape must be (out_features, in_features) of non-negative ints; got {self.shape!r}")
        if not isinstance(self.blocksize, int) or self.blocksize <= 0:
            _problem(f"blocksize must be a positive int; got {self.blocksize!r}")
        for name in ("dtype", "compute_dtype"):
            value = getattr(self, name)
            if not (value is None and name == "compute_dtype") and not (
                isinstance(value, torch.dtype) and value.is_floating_point
            ):
                _problem(f"{name} must be a floating-point torch.dtype; got {value!r}")
        entries = self.shape[0] * self.shape[1]
        blocks = math.ceil(entries / self.blocksize)
        self._check_tensor("data", (math.ceil(entries / 2),), torch.uint8)
        self._check_tensor("code", (16,), None)
        if self.nested_code is None:
            self._check_tensor("absmax", (blocks,), None)
            return
        if not isinstance(self.nested_blocksize, int) or self.nested_blocksize <= 0:
            _problem(f"nested_blocksize must be a positive int; got {self.nested_blocksize!r}")
        self._check_tensor("absmax", (blocks,), torch.uint8)
        self._check_tensor("nested_code", (256,), None)
        self._check_tensor("nested_absmax", (math.ceil(blocks / self.nested_blocksize),), None)
        self._check_tensor("offset", None, None)

    def _check_tensor(self, name: str, shape: tuple[int, ...] | None, dtype: torch.dtype | None) -> None:
        value = getattr(self, name)
        if not isinstance(value, Tensor):
            _problem(f"{name} must be a tensor; got {type(value).__name__}")
        if dtype is not None and value.dtype != dtype:
            _problem(f"{name} must be {dtype}; got {value.dtype}")
        if dtype is None and not value.is_floating_point():
            _problem(f"{name} must be a floating-point tensor; got {value.dtype}")
        if shape is not None and tuple(value.shape) != shape:
            _problem(f"{name} of a {self.shape} weight must have shape {shape}; got {tuple(value.shape)}")
        if name != "code" and value.device != self.data.device:  # ``decode`` moves the 16-entry table itself
            _problem(f"{name} is on {value.device} but data is on {self.data.device}")

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nested(self) -> bool:
        """Whether the scales are double-quantized."""
        return self.nested_code is not None


def _absmax_at(packed: Packed4bit, blocks: Tensor) -> Tensor:
    """The fp32 scales of ``blocks`` (int64, any shape), decoding double-quantized scales for those blocks only."""
    if not packed.nested:
        return packed.absmax.float()[blocks]
    codes = packed.absmax[blocks].long()
    return packed.nested_code[codes] * packed.nested_absmax[blocks // packed.nested_blocksize] + packed.offset


def decode(
    packed: Packed4bit, rows: Tensor | None = None, cols: Tensor | None = None, *, check: bool = False
) -> Tensor:
    """``W[rows][:, cols]`` of a 4-bit weight (None: all), decoding only those entries; ``(len(rows) or
    out_features, len(cols) or in_features)`` in ``packed.dtype``.

    ``rows`` / ``cols``: 1-D int64 on ``packed.device``, in range, any order; ``check=True`` checks
    that (one device sync per index tensor), ``sparse_matmul`` checks them itself. The code of flat
    entry ``f = i * in + j`` is the high nibble of byte ``f // 2`` for even ``f``, the low one for
    odd; its scale is block ``f // blocksize``. Rows with an even width and ``blocksize``-aligned rows
    take the fast paths (whole bytes / whole blocks per row).
    """
    out_features, in_features = packed.shape
    if check:
        for idx, limit, name in ((rows, out_features, "rows"), (cols, in_features, "cols")):
            if idx is not None:
                check_indices(idx, limit, packed.device, name, sorted_unique=False)
    size = packed.blocksize
    data = packed.data
    device = data.device
    row_idx = rows if rows is not None else torch.arange(out_features, device=device)
    col_idx = cols if cols is not None else torch.arange(in_features, device=device)
    n_rows, n_cols = row_idx.numel(), col_idx.numel()
    table = packed.code.to(device, torch.float32)
    if in_features % 2 == 0:
        grid = data.view(out_features, in_features // 2)
        if rows is not None:
            grid = grid.index_select(0, rows)
        if cols is None:  # whole bytes: one lookup of both codes per byte
            pairs = torch.stack((table.repeat_interleave(16), table.repeat(16)), dim=1)
            codes = pairs[grid.long()].view(n_rows, in_features)
        else:
            shift = ((cols & 1) ^ 1).mul(4).to(torch.uint8)
            codes = table[((grid.index_select(1, cols >> 1) >> shift) & 15).long()]
    else:
        flat = row_idx[:, None] * in_features + col_idx[None, :]
        shift = ((flat & 1) ^ 1).mul(4).to(torch.uint8)
        codes = table[((data[flat >> 1] >> shift) & 15).long()]
    if in_features % size == 0:
        per_row = in_features // size
        if cols is None:
            blocks = row_idx[:, None] * per_row + torch.arange(per_row, device=device)
            values = (codes.view(n_rows, per_row, size) * _absmax_at(packed, blocks)[..., None]).view(n_rows, n_cols)
        else:
            values = codes * _absmax_at(packed, row_idx[:, None] * per_row + (cols // size)[None, :])
    else:
        values = codes * _absmax_at(packed, (row_idx[:, None] * in_features + col_idx[None, :]) // size)
    return values.to(packed.dtype)
