"""Calibration of contextual sparsity from the activations of the dense warm-up steps.

Two things are learnt from the last few dense steps, at no extra forward cost:

* the second moment of each sparse block's context-token inputs, from which the SVD estimator
  builds *whitened* factors (``SVDEstimator.calibrate``): rank goes to the input directions that
  actually occur, so its channel ranking tracks the exact activations closely;
* for ``mlp_sparsity="auto"``, each MLP's *sensitivity*: the error its dropped channels add to
  the residual stream at every sparsity of ``SPARSITY_GRID``, measured on sampled context tokens
  with the calibrated estimator's own choices. ``allocate_sparsity`` then picks per-layer
  sparsities that minimise the summed error under a FLOPs budget.

Pure torch (no Lightning); the callback gathers and reduces the statistics and applies the result.
See ``docs/contextual_sparsity.md`` ("Calibration").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor

from lightning_sft.sparsity.estimators import ChannelEstimator
from lightning_sft.sparsity.schedule import kept_channels

# Sparsities ``mlp_sparsity="auto"`` chooses from; 0.99 is the reference's deepest setting.
SPARSITY_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.625, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)


class InputStatistics:
    """What calibration keeps of one sparse block's context-token inputs.

    ``gram`` (sum of ``x x^T``, fp32, on the activations' device) and ``tokens`` for the whitened
    estimator. For sensitivity, per observed batch (the last ``sample_batches``): the per-sample
    context means (what the MLP estimators select from) and up to ``sample_rows`` context-token
    rows drawn by a seeded generator; plus the residual stream's mean squared norm over the
    context tokens, the scale an MLP's error is judged against.
    """

    def __init__(self, sample_rows: int = 256, sample_batches: int = 4, seed: int = 0) -> None:
        self.sample_rows = sample_rows
        self.sample_batches = sample_batches
        self.gram: Tensor | None = None
        self.tokens = 0
        self.samples: list[tuple[Tensor, Tensor]] = []
        self.residual_sq: Tensor | None = None
        self.residual_tokens = 0
        self._generator = torch.Generator().manual_seed(seed)

    def update(self, x: Tensor, context_mask: Tensor) -> None:
        """Add a batch: ``x`` (B, S, H) block inputs, ``context_mask`` (B, S) bool, True = context."""
        rows = x.detach()[context_mask].float()
        if rows.shape[0] == 0:
            return
        gram = rows.T @ rows
        self.gram = gram if self.gram is None else self.gram + gram
        self.tokens += rows.shape[0]
        counts = context_mask.sum(dim=1)
        sums = (context_mask.to(x.dtype).unsqueeze(1) @ x.detach()).squeeze(1).float()
        pooled = sums[counts > 0] / counts[counts > 0, None].float()
        pick = torch.randperm(rows.shape[0], generator=self._generator)[: self.sample_rows].to(rows.device)
        self.samples = [*self.samples, (pooled, rows.index_select(0, pick))][-self.sample_batches :]

    def update_residual(self, residual: Tensor, context_mask: Tensor) -> None:
        """Add the residual stream after the block's layer, over the same context tokens."""
        rows = residual.detach()[context_mask].float()
        total = rows.square().sum()
        self.residual_sq = total if self.residual_sq is None else self.residual_sq + total
        self.residual_tokens += rows.shape[0]

    def reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Sum ``gram``, ``tokens`` and the residual sums over processes (DDP), so every rank
        builds the same estimator; ``reduce_sum`` all-reduces one tensor."""
        if self.gram is None:
            raise RuntimeError("No context token was observed: nothing to calibrate from.")
        self.gram = reduce_sum(self.gram)
        self.tokens = int(reduce_sum(torch.tensor(float(self.tokens), device=self.gram.device)).item())
        if self.residual_sq is not None:
            self.residual_sq = reduce_sum(self.residual_sq)
            count = torch.tensor(float(self.residual_tokens), device=self.gram.device)
            self.residual_tokens = int(reduce_sum(count).item())

    def state_dict(self) -> dict[str, Tensor]:
        """Everything, for a checkpoint taken in the middle of the calibration steps."""
        state: dict[str, Tensor] = {"tokens": torch.tensor(self.tokens), "generator": self._generator.get_state()}
        state["residual_tokens"] = torch.tensor(self.residual_tokens)
        if self.gram is not None:
            state["gram"] = self.gram
        if self.residual_sq is not None:
            state["residual_sq"] = self.residual_sq
        for i, (pooled, rows) in enumerate(self.samples):
            state[f"sample{i}.pooled"], state[f"sample{i}.rows"] = pooled, rows
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.tokens = int(state["tokens"])
        self.residual_tokens = int(state["residual_tokens"])
        self._generator.set_state(state["generator"])
        self.gram = state.get("gram")
        self.residual_sq = state.get("residual_sq")
        count = sum(1 for key in state if key.endswith(".pooled"))
        self.samples = [(state[f"sample{i}.pooled"], state[f"sample{i}.rows"]) for i in range(count)]


class SensitiveMLP(Protocol):
    """What ``mlp_errors`` needs of a sparse MLP block (``sparse_blocks.SparseBlock``)."""

    estimator: ChannelEstimator
    intermediate: int

    def dropped_output(self, rows: Tensor, idx: Tensor) -> Tensor: ...


@torch.no_grad()
def mlp_errors(mlp: SensitiveMLP, statistics: InputStatistics, grid: Sequence[float] = SPARSITY_GRID) -> Tensor:
    """Per grid sparsity: the summed squared norm of what the dropped channels would have added,
    over the sampled rows, with the channels the estimator picks for each sampled batch; then the
    row count. Shape ``(len(grid) + 1,)``: sums are all-reducible before ``relative_errors``."""
    if not statistics.samples:
        raise RuntimeError("No calibration sample was observed for this MLP.")
    sums = []
    for sparsity in grid:
        k = kept_channels(mlp.intermediate, sparsity)
        total = torch.zeros((), dtype=torch.float64)
        for pooled, rows in statistics.samples:
            idx = mlp.estimator.select(pooled, k)
            total += mlp.dropped_output(rows, idx).double().square().sum().cpu()
        sums.append(total)
    rows_seen = sum(rows.shape[0] for _, rows in statistics.samples)
    return torch.stack([*sums, torch.tensor(float(rows_seen), dtype=torch.float64)])


def relative_errors(error_sums: Tensor, residual_sq: Tensor, residual_tokens: int) -> Tensor:
    """``mlp_errors`` rows (possibly summed over ranks) -> mean ||dropped output||^2 per token over
    mean ||residual||^2 per token: the relative perturbation the next layers' norms see."""
    scale = residual_sq.double().cpu() / max(residual_tokens, 1)
    return error_sums[:-1] / error_sums[-1].clamp_min(1) / scale.clamp_min(1e-30)


def allocate_sparsity(
    errors: Tensor, budget: float, grid: Sequence[float] = SPARSITY_GRID, resolution: int = 200
) -> list[float]:
    """Per-layer sparsities from ``grid`` with the least summed error whose mean kept fraction
    ``1 - s`` is at most ``budget`` (equal-size layers, so that is the FLOPs budget: 0.5 costs what
    a uniform 0.5 costs). ``errors[l, g]`` is layer ``l``'s error at ``grid[g]``. Exact: dynamic
    programming over costs in units of ``1 / resolution`` of a layer (a multiple-choice knapsack).
    """
    if errors.ndim != 2 or errors.shape[1] != len(grid):
        raise ValueError(f"errors must be (layers, {len(grid)}), got {tuple(errors.shape)}.")
    if not all(0.0 <= s < 1.0 for s in grid):
        raise ValueError(f"grid sparsities must lie in [0, 1), got {list(grid)}.")
    layers = errors.shape[0]
    costs = [round((1.0 - s) * resolution) for s in grid]
    capacity = int(budget * resolution * layers + 1e-6)
    if layers == 0:
        return []
    if min(costs) * layers > capacity:
        raise ValueError(
            f"flops_budget {budget} is below what the sparsest setting ({max(grid)} on every layer) costs,"
            f" {min(costs) / resolution:.3f}; raise it."
        )
    inf = float("inf")
    best = torch.full((capacity + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for layer in range(layers):
        candidates = torch.full((len(grid), capacity + 1), inf, dtype=torch.float64)
        for g, cost in enumerate(costs):
            if cost <= capacity:
                candidates[g, cost:] = best[: capacity + 1 - cost] + float(errors[layer, g])
        best, choice = candidates.min(dim=0)
        choices.append(choice)
    spent = int(torch.argmin(best))
    picked = []
    for layer in reversed(range(layers)):
        g = int(choices[layer][spent])
        picked.append(grid[g])
        spent -= costs[g]
    return picked[::-1]
