"""FLOP accounting for a training step: measured FLOPs, skipped FLOPs and token counts.

This module is pure logic on top of torch (no Lightning import), so callbacks that skip work
(contextual sparsity, layer dropout) can report what they skipped without depending on the
monitor, and the pieces can be tested without a Trainer.

The skipped-FLOPs contract
--------------------------
A callback that skips computation during a training step calls
``report_skipped_flops(pl_module, source, flops)`` on the *root* LightningModule, at any point
between that batch's ``on_train_batch_start`` and the end of its backward pass (from its own
``on_train_batch_start``, from forward hooks, or from backward hooks). ``EfficiencyMonitor``
consumes the ledger in ``on_after_backward`` (and again at ``on_train_batch_end`` to pick up late
reports), so the result does not depend on the order of the callbacks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

_LEDGER_ATTR = "_lightning_sft_flops_ledger"


class FlopsLedger:
    """Per-source sums of the FLOPs that callbacks skipped since the last ``consume()``."""

    def __init__(self) -> None:
        self._skipped: dict[str, float] = {}

    def report_skipped(self, source: str, flops: float) -> None:
        """Add ``flops`` skipped by ``source`` (a short name, used as a metric-key suffix)."""
        if not isinstance(source, str) or not source:
            raise ValueError(f"source must be a non-empty string naming the reporter, got {source!r}.")
        value = float(flops)
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"Skipped FLOPs reported by {source!r} must be finite and >= 0, got {flops!r}. "
                "Report the FLOPs the step did NOT execute, not a delta that can go negative."
            )
        self._skipped[source] = self._skipped.get(source, 0.0) + value

    def consume(self) -> dict[str, float]:
        """Return the per-source sums and clear them, so each batch is counted once."""
        skipped, self._skipped = self._skipped, {}
        return skipped


def flops_ledger(module: torch.nn.Module) -> FlopsLedger:
    """Get or create the ledger attached to ``module`` (pass the root LightningModule).

    Stored with ``object.__setattr__`` as a plain attribute: it is neither a submodule, a buffer
    nor a parameter, so it stays out of ``state_dict`` and device moves.
    """
    ledger = module.__dict__.get(_LEDGER_ATTR)
    if ledger is None:
        ledger = FlopsLedger()
        object.__setattr__(module, _LEDGER_ATTR, ledger)
    return ledger


def report_skipped_flops(module: torch.nn.Module, source: str, flops: float) -> None:
    """Report FLOPs that ``source`` skipped in the current training step (see module docstring)."""
    flops_ledger(module).report_skipped(source, flops)


def count_tokens(batch: Any) -> int:
    """Count the tokens in a batch of a language-model data loader.

    Rules: a Mapping with ``attention_mask`` -> its sum (padding excluded); else with
    ``input_ids`` -> its numel; a tensor -> numel when ``ndim <= 2`` (batch x seq of ids), else
    the product of its first two dims; a tuple/list -> the rule of its first tensor or mapping.
    """
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum().item())
        input_ids = batch.get("input_ids")
        if isinstance(input_ids, torch.Tensor):
            return input_ids.numel()
    elif isinstance(batch, torch.Tensor):
        return batch.numel() if batch.ndim <= 2 else batch.shape[0] * batch.shape[1]
    elif isinstance(batch, (tuple, list)):
        for item in batch:
            if isinstance(item, (torch.Tensor, Mapping)):
                return count_tokens(item)
    raise TypeError(
        f"Cannot count tokens in a batch of type {type(batch).__name__}: expected a mapping with "
        "'attention_mask' or 'input_ids', a tensor of token ids, or a tuple/list holding one. "
        "Pass EfficiencyMonitor(tokens_fn=lambda batch: <number of tokens>) to count them yourself."
    )


class StepFlopCounter:
    """``FlopCounterMode`` that is started in one hook and stopped in another.

    ``FlopCounterMode`` is a context manager, but Lightning splits a training step across hooks
    (``on_train_batch_start`` ... ``on_after_backward``), so no single ``with`` block spans it.
    Start and stop must still nest properly with other dispatch modes (LIFO), which holds when
    both happen in Lightning hooks around the step.
    """

    def __init__(self) -> None:
        self._mode: FlopCounterMode | None = None

    @property
    def running(self) -> bool:
        return self._mode is not None

    def start(self) -> None:
        if self._mode is not None:
            raise RuntimeError("StepFlopCounter.start() called while already running; call stop() first.")
        mode = FlopCounterMode(display=False)
        mode.__enter__()
        self._mode = mode

    def total(self) -> int:
        """FLOPs counted so far, readable while running (e.g. right after a backward pass)."""
        if self._mode is None:
            raise RuntimeError("StepFlopCounter.total() needs a running counter; call start() first.")
        return self._mode.get_total_flops()

    def stop(self) -> int:
        """Stop counting and return the FLOPs counted since ``start()``."""
        if self._mode is None:
            raise RuntimeError("StepFlopCounter.stop() called without start().")
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        return mode.get_total_flops()
