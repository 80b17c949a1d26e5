"""Exact-match accuracy of responses, read off one teacher-forced forward pass."""

from __future__ import annotations

import torch
from torchmetrics import Metric

IGNORE_INDEX = -100


class ResponseExactMatch(Metric):
    """Fraction of samples whose every response token is the model's argmax prediction.

    With the response ending in EOS, this equals exact match of greedy decoding: greedy decoding
    reproduces the response token by token exactly when each teacher-forced argmax is right. It
    costs one forward pass instead of a generation loop.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        predictions = logits[:, :-1].argmax(dim=-1)
        targets = labels[:, 1:]
        scored = targets != IGNORE_INDEX
        wrong = (predictions != targets) & scored
        has_response = scored.any(dim=1)
        self.correct += (has_response & ~wrong.any(dim=1)).sum()
        self.total += has_response.sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)
