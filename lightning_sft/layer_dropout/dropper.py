"""Skipping blocks during training: each block's ``forward`` is replaced, on the instance, by one
that returns its input when the step's plan drops it.

Pure torch (no Lightning). Replacing the instance attribute ``forward`` (rather than wrapping the
block in another module) keeps parameter names, ``state_dict`` keys, hooks and saved adapters
unchanged; ``remove()`` puts the original back.

A dropped block runs nothing, so autograd stores nothing for it and its parameters get no
gradient. Under DDP that would break Lightning's default ``find_unused_parameters=False``, so with
``ghost=True`` the identity also adds ``0 * (one element of each trainable parameter)``: every
parameter then takes part in the graph and receives a zero gradient, at the cost of a few scalar ops.
The same term keeps the loss differentiable in a step that skips every block.
Per-sample dropping runs the block only on the kept rows of the batch (tensors whose first dim is
the batch are sliced, others passed as they are) and writes them back into the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sft.anatomy.modules import install_stamp, instance_forward, restore_forward
from lightning_sft.anatomy.stacks import block_step_flops


@dataclass
class DroppableBlock:
    """One block the dropper controls."""

    name: str
    module: nn.Module
    index: int  # position among all controlled blocks
    original: Callable[..., Any]
    previous: Callable[..., Any] | None = None  # the instance forward wrapped (None: the class's)
    tuple_length: int | None = None  # None: forward returns a tensor
    seen: bool = False  # a dense call recorded the output format


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, Tensor):
        raise TypeError(
            f"Layer dropout cannot find the hidden states of block {name!r}: its first argument (or"
            " `hidden_states=`) is not a tensor. Only blocks called as block(hidden_states, ...) can be skipped."
        )
    return hidden


def _rows(value: Any, kept: Tensor, batch: int) -> Any:
    """``value`` restricted to the ``kept`` rows wherever its first dim is the batch."""
    if isinstance(value, Tensor):
        return value.index_select(0, kept) if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(item, kept, batch) for item in value)
    if isinstance(value, dict):
        return {key: _rows(item, kept, batch) for key, item in value.items()}
    return value


class LayerDropper:
    """Installs droppable forwards on the blocks and applies one plan per training step."""

    def __init__(self, blocks: list[tuple[str, nn.Module]], on_skip: Callable[[float], None] | None = None) -> None:
        self.blocks = [DroppableBlock(name, module, i, module.forward) for i, (name, module) in enumerate(blocks)]
        self.on_skip = on_skip
        self.ghost = False
        self.installed = False
        self.installed_at = 0  # install_stamp() of the last install
        # The current step's plan: blocks dropped whole, and (per-sample) the kept-row draws.
        self.dropped: set[int] = set()
        self.sample_probabilities: list[float] | None = None
        self.sample_generator: torch.Generator | None = None
        self.row_draws: Tensor | None = None
        # Rows each block was asked to process in training, and rows it skipped: how much each block trained.
        self.rows_seen = [0] * len(self.blocks)
        self.rows_skipped = [0] * len(self.blocks)

    def run_fractions(self) -> dict[str, float]:
        """Each block's fraction of training rows it ran on (1.0 for a block not called in training yet)."""
        return {
            block.name: 1.0 - skipped / seen if seen else 1.0
            for block, seen, skipped in zip(self.blocks, self.rows_seen, self.rows_skipped)
        }

    def install(self) -> None:
        """Wrap each block's current forward (one changed since the last ``remove`` included)."""
        if self.installed:
            return
        for block in self.blocks:
            block.original = block.module.forward
            block.previous = instance_forward(block.module)
            block.module.forward = self._forward_of(block)
        self.installed = True
        self.installed_at = install_stamp()

    def remove(self) -> None:
        """Put back the forwards ``install`` found."""
        for block in self.blocks:
            restore_forward(block.module, block.previous)
        self.installed = False

    def formats(self) -> dict[str, int]:
        """The output format each block showed (0: a tensor, n: a tuple of n), for checkpoints."""
        return {block.name: block.tuple_length or 0 for block in self.blocks if block.seen}

    def load_formats(self, formats: dict[str, int]) -> None:
        for block in self.blocks:
            if block.name in formats:
                block.tuple_length = formats[block.name] or None
                block.seen = True

    def plan_layers(self, probabilities: list[float], generator: torch.Generator) -> None:
        """Draw which blocks this step drops whole."""
        draws = torch.rand(len(self.blocks), generator=generator).tolist()
        self.dropped = {i for i, (u, p) in enumerate(zip(draws, probabilities)) if u < p}
        self.sample_probabilities = None

    def plan_samples(self, probabilities: list[float], generator: torch.Generator) -> None:
        """Drop per sample: rows are drawn at the step's first block call, once the batch size is known."""
        self.dropped = set()
        self.sample_probabilities = probabilities
        self.sample_generator = generator
        self.row_draws = None

    def dropped_fraction(self) -> float:
        """The fraction of block computations (per sample: block x row) the current step skips."""
        if self.sample_probabilities is None:
            return len(self.dropped) / len(self.blocks)
        if self.row_draws is None:
            return 0.0
        probabilities = torch.tensor(self.sample_probabilities)[:, None]
        return float((self.row_draws < probabilities).float().mean())

    def clear(self) -> None:
        self.dropped = set()
        self.sample_probabilities = None
        self.row_draws = None

    def _kept_rows(self, block: DroppableBlock, batch: int, device: torch.device) -> Tensor | None:
        """Indices of the rows this block runs on; None when it runs on all of them."""
        if self.sample_probabilities is None:
            return None
        if self.row_draws is None or self.row_draws.shape[1] != batch:
            self.row_draws = torch.rand((len(self.blocks), batch), generator=self.sample_generator)
        keep = self.row_draws[block.index] >= self.sample_probabilities[block.index]
        return None if bool(keep.all()) else keep.nonzero().flatten().to(device)

    def _forward_of(self, block: DroppableBlock) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not block.module.training or not torch.is_grad_enabled():
                return self._dense(block, args, kwargs)
            hidden = _hidden(args, kwargs, block.name)
            batch, seq_len = hidden.shape[0], hidden.shape[-2] if hidden.ndim >= 3 else 1
            self.rows_seen[block.index] += batch
            if not block.seen:  # the output format is unknown until one dense call: run this one dense
                self.dropped.discard(block.index)
                return self._dense(block, args, kwargs)
            if block.index in self.dropped:
                return self._skip(block, hidden, batch, batch, seq_len)
            kept = self._kept_rows(block, batch, hidden.device)
            if kept is None:
                return block.original(*args, **kwargs)
            if kept.numel() == 0:
                return self._skip(block, hidden, batch, batch, seq_len)
            output = block.original(*_rows(args, kept, batch), **_rows(kwargs, kept, batch))
            partial = output if block.tuple_length is None else output[0]
            merged = hidden.index_copy(0, kept, partial.to(hidden.dtype))
            self._report(block, batch - kept.numel(), seq_len)
            return merged if block.tuple_length is None else (merged, *output[1:])

        return forward

    def _dense(self, block: DroppableBlock, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        output = block.original(*args, **kwargs)
        if not block.seen:
            hidden = _hidden(args, kwargs, block.name)
            result = output[0] if isinstance(output, tuple) else output
            if not isinstance(result, Tensor) or result.shape != hidden.shape:
                shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
                raise TypeError(
                    f"Block {block.name!r} maps hidden states of shape {tuple(hidden.shape)} to {shape}; only residual"
                    " blocks that keep the shape can be skipped as the identity. Name the right stacks with `blocks=`."
                )
            block.tuple_length = len(output) if isinstance(output, tuple) else None
            block.seen = True
        return output

    def _skip(self, block: DroppableBlock, hidden: Tensor, rows: int, batch: int, seq_len: int) -> Any:
        output = hidden
        # Also when every block is skipped: the loss must still reach a trainable parameter.
        # Looked up now: adapters may have been injected or rebuilt since, and inside a sharded block's
        # forward FSDP2 holds its parameters as plain full tensors in place of the DTensors outside it.
        trainable = [p for p in block.module.parameters() if p.requires_grad]
        if (self.ghost or len(self.dropped) == len(self.blocks)) and trainable:
            touch = torch.stack([p.reshape(-1)[0] for p in trainable]).sum()
            output = hidden + (touch * 0.0).to(hidden.dtype)
        self._report(block, rows, seq_len)
        if block.tuple_length is None:
            return output
        return (output,) + (None,) * (block.tuple_length - 1)

    def _report(self, block: DroppableBlock, rows: int, seq_len: int) -> None:
        self.rows_skipped[block.index] += rows
        if self.on_skip is not None and rows > 0:
            self.on_skip(block_step_flops(block.module, rows, seq_len))
