"""torchmetrics aggregation of per-step efficiency numbers.

Sum-reduced states make the epoch values exact ratios of totals (not means of per-step ratios)
and let torchmetrics sync them across ranks with ``dist_reduce_fx="sum"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class EfficiencyTracker(Metric):
    """Aggregates tokens, step time and FLOPs over optimizer steps (and ranks).

    ``compute()`` returns ``tokens_per_s``, ``step_time_s`` (mean per step) and, when at least one
    step carried FLOPs, ``dense_flops_per_step``, ``effective_flops_per_step`` and ``flops_ratio``
    (effective / dense; 1.0 when there were no dense FLOPs).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    tokens: Tensor
    seconds: Tensor
    steps: Tensor
    dense_flops: Tensor
    effective_flops: Tensor
    flop_steps: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # float64: FLOP totals of an epoch overflow float32's exact range by orders of magnitude.
        for name in ("tokens", "seconds", "steps", "dense_flops", "effective_flops", "flop_steps"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        tokens: int,
        seconds: float,
        dense_flops: float | None = None,
        effective_flops: float | None = None,
    ) -> None:
        """Record one optimizer step; pass both FLOP values or neither (FLOPs unknown)."""
        if tokens < 0 or seconds < 0:
            raise ValueError(f"tokens and seconds must be >= 0, got tokens={tokens}, seconds={seconds}.")
        if (dense_flops is None) != (effective_flops is None):
            raise ValueError("Pass both dense_flops and effective_flops, or neither when FLOPs are unknown.")
        self.tokens += tokens
        self.seconds += seconds
        self.steps += 1
        if dense_flops is not None and effective_flops is not None:
            self.dense_flops += dense_flops
            self.effective_flops += effective_flops
            self.flop_steps += 1

    def compute(self) -> dict[str, Tensor]:
        result = {
            "tokens_per_s": torch.where(self.seconds > 0, self.tokens / self.seconds, torch.zeros_like(self.tokens)),
            "step_time_s": self.seconds / self.steps.clamp_min(1),
        }
        if self.flop_steps > 0:
            result["dense_flops_per_step"] = self.dense_flops / self.flop_steps
            result["effective_flops_per_step"] = self.effective_flops / self.flop_steps
            result["flops_ratio"] = torch.where(
                self.dense_flops > 0, self.effective_flops / self.dense_flops, torch.ones_like(self.dense_flops)
            )
        return result
