"""Weighted averaging of client adapter updates, and the checks a reply passes before it counts.

Pure torch (no Lightning, no Flower). Weights are per tensor, so a block a client skipped under
layer dropout can count for less in that block's average than in the others (``weighting="layer"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

WEIGHTINGS = ("examples", "uniform", "layer")


def check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"Unknown weighting {weighting!r}; choose 'examples' (FedAvg: by local training-set size), 'uniform', or"
            " 'layer' (by the examples that actually ran through each block under layer dropout)."
        )
    return weighting


def problem_with(update: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str | None:
    """Why ``update`` cannot be averaged into ``expected``'s tensors, or None: names, shapes, finiteness."""
    missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
    if missing or extra:
        return f"its tensors differ from the ones sent (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, tensor in update.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            return f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
        if not bool(torch.isfinite(tensor).all()):
            return f"{name} holds non-finite values"
    return None


def tensor_weights(
    names: Sequence[str],
    groups: Mapping[str, str],
    weighting: str,
    examples: float,
    run_fractions: Mapping[str, float],
) -> dict[str, float]:
    """One client's weight for each tensor: 1, its training examples, or examples x its block's run fraction."""
    if weighting == "uniform":
        return {name: 1.0 for name in names}
    if weighting == "examples":
        return {name: float(examples) for name in names}
    return {name: float(examples) * run_fractions.get(groups.get(name, ""), 1.0) for name in names}


def weighted_average(
    previous: Mapping[str, Tensor],
    updates: Sequence[Mapping[str, Tensor]],
    weights: Sequence[Mapping[str, float]],
) -> dict[str, Tensor]:
    """``sum_c w_c[k] u_c[k] / sum_c w_c[k]`` per tensor ``k``, in float64, cast back to ``previous``'s dtype.

    A tensor no client trained (total weight 0) keeps its previous value. Raises on an update that
    :func:`problem_with` refuses or a negative weight: the caller filters replies first.
    """
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weight maps.")
    for update in updates:
        problem = problem_with(update, previous)
        if problem is not None:
            raise ValueError(f"Cannot average an update: {problem}.")
    result = {}
    for name, old in previous.items():
        w = [float(weight[name]) for weight in weights]
        if any(x < 0 for x in w):
            raise ValueError(f"Negative aggregation weight for {name}: {w}.")
        total = sum(w)
        if total == 0:
            result[name] = old.clone()
            continue
        acc = torch.zeros(old.shape, dtype=torch.float64)
        for x, update in zip(w, updates):
            acc += (x / total) * update[name].double()
        result[name] = acc.to(old.dtype)
    return result
