"""Which tokens are context (run sparse) and which are output (run dense), from a causal LM's labels."""

from __future__ import annotations

import torch

from lightning_sft.tasks.exact_match import IGNORE_INDEX


def context_mask_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """True where a position's prediction is not scored: those tokens run sparse.

    HF causal LMs predict token t+1 at position t, so position t is an *output* position when
    ``labels[t + 1]`` is scored. This keeps the last prompt token (which predicts the first answer
    token) dense, and lets the final position (whose prediction is never scored) go sparse.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"Token labels of shape (batch, seq) are needed to tell context from output tokens, got {shape}"
            " (e.g. sequence-classification labels): pass token_mask_fn=batch -> BoolTensor (B, S)."
        )
    scored_next = torch.zeros_like(labels, dtype=torch.bool)
    scored_next[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return ~scored_next
