"""What every sparse block of one model reads each forward (the switches, the context mask) and
reports back (skipped FLOPs, achieved sparsity, estimator time). Pure torch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_sft.sparsity.calibration import InputStatistics
from lightning_sft.sparsity.estimators import ChannelEstimator


@dataclass
class SparsityState:
    """What every sparse block of one model reads each forward, and what it reports back.

    A callback sets ``active`` and ``context_mask`` (bool ``(B, S)``; True = context token to run
    sparse, False = output token or padding, kept dense) before each forward, and reads then
    ``reset``s the accumulators after each step. ``sparse_output_tokens`` runs every token sparse
    (the channels are still chosen from the context tokens only). While ``observing`` (dense
    calibration steps), each sparse block adds its context-token inputs to ``statistics[name]``.
    """

    active: bool = False
    context_mask: Tensor | None = None
    sparse_output_tokens: bool = False
    observing: bool = False
    statistics: dict[str, InputStatistics] = field(default_factory=dict)
    skipped_flops: float = 0.0
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    _estimator_seconds: float = 0.0
    _estimator_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def reset(self) -> None:
        """Clear the per-step accumulators (not the switches)."""
        self.skipped_flops = 0.0
        self.layer_sparsity = {}
        self._estimator_seconds = 0.0
        self._estimator_events = []

    def checked_mask(self, x: Tensor, name: str) -> Tensor:
        """``context_mask`` on ``x``'s device, checked against a (B, S, H) input of layer ``name``."""
        mask = self.context_mask.to(x.device)
        if x.ndim != 3 or mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"{name}: state.context_mask must be a bool (batch, seq) tensor matching the layer input"
                f" {tuple(x.shape)}, got {mask.dtype} {tuple(mask.shape)}."
            )
        return mask

    def observe(self, name: str, x: Tensor) -> None:
        """Calibration: add layer ``name``'s context-token inputs ``x`` to its statistics."""
        if not self.observing or self.context_mask is None:
            return
        mask = self.checked_mask(x, name)
        self.statistics.setdefault(name, InputStatistics()).update(x, mask)

    def select(self, estimator: ChannelEstimator, x: Tensor, k: int, mask: Tensor) -> Tensor:
        """``estimator.select``, timed (CUDA events on GPU, so no synchronisation here)."""
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            idx = estimator.select(x, k, context_mask=mask)
            end.record()
            self._estimator_events.append((start, end))
            return idx
        start_time = time.perf_counter()
        idx = estimator.select(x, k, context_mask=mask)
        self._estimator_seconds += time.perf_counter() - start_time
        return idx

    def estimator_seconds(self) -> float:
        """Time spent choosing channels since ``reset`` (waits for the last CUDA event)."""
        if self._estimator_events:
            self._estimator_events[-1][1].synchronize()
        gpu = sum(start.elapsed_time(end) for start, end in self._estimator_events) / 1000.0
        return self._estimator_seconds + gpu
