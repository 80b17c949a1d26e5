"""Which weight entries a sparse fine-tune trains: the initial choice and periodic drop-and-regrow.

Pure tensor logic, no Lightning. Scores are accumulated from dense weight gradients:
``fisher`` sums squared gradients (the diagonal empirical Fisher over batches, as FISH masks do);
``grad`` sums gradients and ranks by the magnitude of the sum (entries every batch pushes the same
way); ``weight`` ranks by the frozen weight's magnitude; ``random`` draws uniformly.
"""

from __future__ import annotations

import torch

SELECTIONS = ("fisher", "grad", "weight", "random")
GRADIENT_SELECTIONS = ("fisher", "grad")


def validate_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"`selection` must be one of {', '.join(SELECTIONS)}; got {selection!r}. 'fisher' is the default.")


def validate_fraction(value: float, name: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"`{name}` must be a fraction in (0, 1); got {value!r}. {hint}")


def validate_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"`density` must be a fraction in (0, 1]; got {density!r}. 0.01 trains 1% of each weight.")


def entry_count(numel: int, density: float) -> int:
    """Entries trained in a tensor of ``numel`` entries: ``density`` of them, at least one."""
    return min(numel, max(1, round(density * numel)))


def accumulate(score: torch.Tensor, gradient: torch.Tensor, selection: str) -> None:
    """Add one batch's dense weight gradient to a running fp32 score, in place."""
    gradient = gradient.to(score.dtype)
    if selection == "fisher":
        score.addcmul_(gradient, gradient)
    else:
        score.add_(gradient)


def ranking(score: torch.Tensor, selection: str) -> torch.Tensor:
    """Higher is more worth training: the Fisher sum itself, or the magnitude of the summed gradient."""
    return score.abs() if selection == "grad" else score


def top_entries(importance: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices (sorted) of the ``count`` most important entries."""
    return torch.topk(importance.reshape(-1).float(), count, sorted=False).indices.sort().values


def random_importance(numel: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform random importance: ``top_entries`` of it is a uniform random choice."""
    return torch.rand(numel, generator=generator)


def drop_and_regrow(
    indices: torch.Tensor, values: torch.Tensor, importance: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SpIEL's update: drop the ``fraction`` of trained entries whose deltas moved least and regrow
    as many of the untrained entries, the most important ones.

    Returns ``(positions, new_indices)``: the slots of ``indices`` to reuse and the entries they
    now hold. Entries trained now are never regrown, so every regrown entry is new.
    """
    untrained = importance.numel() - indices.numel()
    swap = min(round(fraction * indices.numel()), untrained)
    if swap <= 0:
        empty = torch.zeros(0, dtype=torch.int64, device=indices.device)
        return empty, empty.clone()
    positions = torch.sort(values.detach().abs(), stable=True).indices[:swap]
    masked = importance.detach().reshape(-1).float().clone()
    masked[indices] = -torch.inf
    return positions, torch.topk(masked, swap, sorted=False).indices
