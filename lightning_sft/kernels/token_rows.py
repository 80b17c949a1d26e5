"""Split the token rows of a ``(tokens, features)`` tensor into the context rows (run sparse) and
the others, and merge the two results back in place, each the other's backward.

Contextual sparsity runs the context tokens through sparse products and the rest densely. Doing
that with ``index_select`` and ``index_copy`` into a zero tensor pays, in backward, a full-size
zero fill plus a ``scatter_add`` per group. ``TokenRows`` instead writes every row exactly once
in both directions. SFT masks are a few long runs (one prompt per sample, then its answer and
padding), so a group is taken as row views (no copy for a single run) and one ``cat``; a mask so
fragmented that a view per run would cost more than copying by index falls back to
``index_select`` / ``index_copy_`` into an uninitialised tensor.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

# The fixed cost of one run (two views and a cat entry, fwd + bwd) is about that of copying this
# many elements by index on CPU: below it per run, positions are cheaper than runs.
_RUN_ELEMENTS = 4096


class TokenRows:
    """How a flat bool mask (True = context row) partitions one forward's token rows.

    Built once per forward (one host sync for the run boundaries) and shared by every product of
    a layer that splits the same rows. ``split`` and ``merge`` are differentiable.
    """

    def __init__(self, flat_mask: Tensor) -> None:
        if flat_mask.dim() != 1 or flat_mask.dtype != torch.bool:
            raise ValueError(f"TokenRows needs a 1-D bool mask, got {flat_mask.dtype} {tuple(flat_mask.shape)}")
        self.mask = flat_mask
        self.rows = flat_mask.numel()
        if self.rows == 0:
            self.lengths, self.context_first = [], True
        else:
            change = (flat_mask[1:] != flat_mask[:-1]).nonzero().squeeze(1) + 1
            first, *starts = torch.cat([flat_mask[:1].long(), change]).tolist()
            bounds = [0, *starts, self.rows]
            self.lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
            self.context_first = bool(first)
        # Runs alternate between the groups; the context runs are every other one.
        lead = 0 if self.context_first else 1
        self.context_lengths = self.lengths[lead::2]
        self.other_lengths = self.lengths[1 - lead :: 2]
        self.context_rows = sum(self.context_lengths)
        self.other_rows = self.rows - self.context_rows

    @functools.cached_property
    def _positions(self) -> tuple[Tensor, Tensor]:
        return self.mask.nonzero().squeeze(1), (~self.mask).nonzero().squeeze(1)

    def _by_runs(self, width: int) -> bool:
        return len(self.lengths) * _RUN_ELEMENTS <= self.rows * width

    def _interleave(self, context: list[Tensor], other: list[Tensor]) -> list[Tensor]:
        pieces: list[Any] = [None] * len(self.lengths)
        lead = 0 if self.context_first else 1
        pieces[lead::2], pieces[1 - lead :: 2] = context, other
        return pieces

    def split_raw(self, x: Tensor, columns: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(context rows, other rows) of a 2-D ``x``, without autograd; ``columns`` keeps only
        those columns of the context rows. A group that is one run is a view of ``x``."""
        if x.dim() != 2 or x.shape[0] != self.rows:
            raise ValueError(f"TokenRows.split needs a ({self.rows}, features) tensor, got {tuple(x.shape)}")
        if self._by_runs(x.shape[1]):
            pieces = x.split(self.lengths)
            lead = 0 if self.context_first else 1
            context, other = _join(pieces[lead::2], x), _join(pieces[1 - lead :: 2], x)
        else:
            context_pos, other_pos = self._positions
            context, other = x.index_select(0, context_pos), x.index_select(0, other_pos)
        return (context if columns is None else context.index_select(1, columns)), other

    def merge_raw(self, context: Tensor, other: Tensor, columns: Tensor | None = None, width: int = 0) -> Tensor:
        """The ``(rows, features)`` tensor holding ``context`` and ``other`` in their rows, without
        autograd. With ``columns``, ``context`` holds only those columns of ``width``; the others
        are zero."""
        if columns is not None:
            context = context.new_zeros(context.shape[0], width).index_copy_(1, columns, context)
        if context.shape[0] != self.context_rows or other.shape[0] != self.other_rows:
            raise ValueError(
                f"TokenRows.merge needs {self.context_rows} context and {self.other_rows} other rows,"
                f" got {context.shape[0]} and {other.shape[0]}"
            )
        other = other.to(context.dtype)
        if not self.other_rows or not self.context_rows:
            return context if self.other_rows == 0 else other
        if self._by_runs(context.shape[1]):
            pieces = self._interleave(list(context.split(self.context_lengths)), list(other.split(self.other_lengths)))
            return torch.cat(pieces)
        context_pos, other_pos = self._positions
        out = context.new_empty(self.rows, context.shape[1])
        return out.index_copy_(0, context_pos, context).index_copy_(0, other_pos, other)

    def split(self, x: Tensor, columns: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``split_raw`` with autograd: its backward is one ``merge_raw`` (each row written once)."""
        return _SplitRows.apply(self, x, columns)

    def merge(self, context: Tensor, other: Tensor, columns: Tensor | None = None, width: int = 0) -> Tensor:
        """``merge_raw`` with autograd: its backward is one ``split_raw``. When every row is in one
        group and no column scatter is needed, that group is returned as it is (no Function output
        aliasing its input, which autograd forbids modifying in place)."""
        if columns is None and not self.other_rows and other.shape[0] == 0:
            return context
        if not self.context_rows and context.shape[0] == 0:
            return other.to(context.dtype)
        return _MergeRows.apply(self, context, other, columns, width)


def _join(pieces: tuple[Tensor, ...], like: Tensor) -> Tensor:
    if not pieces:
        return like.narrow(0, 0, 0)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class _SplitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, rows: TokenRows, x: Tensor, columns: Tensor | None) -> tuple[Tensor, Tensor]:
        ctx.rows, ctx.columns, ctx.width = rows, columns, x.shape[1]
        return rows.split_raw(x, columns)

    @staticmethod
    def backward(ctx: Any, grad_context: Tensor, grad_other: Tensor) -> tuple[Tensor | None, ...]:
        return None, ctx.rows.merge_raw(grad_context, grad_other, ctx.columns, ctx.width), None


class _MergeRows(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, rows: TokenRows, context: Tensor, other: Tensor, columns: Tensor | None, width: int
    ) -> Tensor:
        ctx.rows, ctx.columns = rows, columns
        ctx.dtypes = context.dtype, other.dtype
        return rows.merge_raw(context, other, columns, width)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad_context, grad_other = ctx.rows.split_raw(grad, ctx.columns)
        return None, grad_context.to(ctx.dtypes[0]), grad_other.to(ctx.dtypes[1]), None, None
