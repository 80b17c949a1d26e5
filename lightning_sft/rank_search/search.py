"""Adaptive LoRA rank: the scoring rule, adapter parameter counts, the per-module rank allocation.

Pure torch, no Lightning; the ``AdaptiveRankSearch`` callback runs the trials and uses these to
decide. A trial trains fresh adapters at one candidate rank for a few steps; its score is

    score(r) = val_loss(r) + penalty * p(r),   p(r) = adapter parameters at r / at the largest candidate,

and the lowest score wins (ties go to the smaller rank). Over several rounds (successive halving)
the better half of the candidates trains again for longer and the last round decides, because early
learning curves cross: a large rank often leads after a few steps and falls behind later.
``per_module`` then redistributes the parameter budget of the winning rank across modules by the
importance measured in the trials.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from lightning_sft.adapters.injection import LoRAConfig

DEFAULT_CANDIDATES = (2, 4, 8, 16, 32)
# Successive halving: each round's trials are this many times longer than the previous round's.
GROWTH = 3


# -- validation ----------------------------------------------------------------------------------------

def validate_candidates(candidates: Any) -> tuple[int, ...]:
    """The candidate ranks, ascending; refuses empty, non-integer, non-positive and repeated ranks."""
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Iterable):
        raise ValueError(f"`candidates` must be a sequence of ranks such as {DEFAULT_CANDIDATES}; got {candidates!r}.")
    ranks = list(candidates)
    if not ranks:
        raise ValueError(f"`candidates` is empty; give at least one rank, e.g. {DEFAULT_CANDIDATES}.")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r <= 0]
    if bad:
        raise ValueError(f"`candidates` must be positive integers; got {bad} in {ranks}. Typical ranks are 2-64.")
    repeated = sorted({r for r in ranks if ranks.count(r) > 1})
    if repeated:
        raise ValueError(f"`candidates` repeats {repeated}; each rank is tried once, so list it once.")
    return tuple(sorted(ranks))


def validate_penalty(penalty: Any) -> float:
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty) or penalty < 0:
        raise ValueError(
            f"`penalty` must be a finite number >= 0; got {penalty!r}. It is the validation loss one adds for the"
            " largest candidate's parameters (0 picks the lowest loss whatever the size)."
        )
    return float(penalty)


# -- parameter counts and scores ------------------------------------------------------------------------

def adapter_params(shapes: Mapping[str, tuple[int, int]], ranks: int | Mapping[str, int]) -> int:
    """Adapter parameters of modules ``name -> (in_features, out_features)``: ``r * (in + out)`` each."""
    return sum(
        (ranks if isinstance(ranks, int) else ranks[name]) * (fan_in + fan_out)
        for name, (fan_in, fan_out) in shapes.items()
    )


def score(val_loss: float, params: int, max_params: int, penalty: float) -> float:
    """``val_loss + penalty * params / max_params``; a diverged trial (NaN or inf loss) scores inf."""
    if not math.isfinite(val_loss):
        return math.inf
    return val_loss + penalty * params / max_params


@dataclass(frozen=True)
class Trial:
    """One candidate's short training run (in one round of the search) and its score."""

    round: int
    rank: int
    params: int
    val_loss: float
    score: float
    steps: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def best(trials: Sequence[Trial], count: int = 1) -> list[Trial]:
    """The ``count`` lowest scores, ties to the smaller rank (fewer parameters for the same objective);
    diverged trials never qualify, and if all diverged the search stops with their losses."""
    finite = sorted((t for t in trials if math.isfinite(t.score)), key=lambda t: (t.score, t.rank))
    if not finite:
        losses = ", ".join(f"r={t.rank}: {t.val_loss}" for t in trials)
        raise RuntimeError(
            f"Every rank-search trial diverged (validation loss {losses}). Lower the learning rate or check the data."
        )
    return finite[:count]


def halving_schedule(candidates: int, rounds: int, trial_steps: int) -> list[tuple[int, int]]:
    """``(steps per trial, trials)`` of each round of successive halving: every candidate trains
    ``trial_steps`` steps; after each round the better half (rounded up) trains again, from scratch,
    for ``GROWTH`` times as many steps; until ``rounds`` rounds or a round would decide nothing."""
    schedule = [(trial_steps, candidates)]
    while len(schedule) < rounds and math.ceil(schedule[-1][1] / 2) > 1:
        steps, count = schedule[-1]
        schedule.append((steps * GROWTH, math.ceil(count / 2)))
    return schedule


def search_steps(schedule: Sequence[tuple[int, int]]) -> int:
    """Optimizer steps the whole search trains: the sum over rounds of steps per trial x trials."""
    return sum(steps * trials for steps, trials in schedule)


def fitted_trial_steps(
    default: int, candidates: int, rounds: int, batches: int | None, accumulate: int, max_steps: int | None
) -> tuple[int, list[str]]:
    """The largest first-round ``trial_steps`` up to ``default`` whose longest round fits ``batches`` training
    batches (``accumulate`` per step; None: unknown) and whose whole search trains at most ``max_steps``
    (None: no budget), down to 1; and why it is below ``default`` (empty when it is not)."""

    def fits_data(steps: int) -> bool:
        return batches is None or halving_schedule(candidates, rounds, steps)[-1][0] * accumulate <= batches

    def fits_budget(steps: int) -> bool:  # the search trains no more steps than the fit it serves
        return max_steps is None or search_steps(halving_schedule(candidates, rounds, steps)) <= max_steps

    steps = default
    while steps > 1 and not (fits_data(steps) and fits_budget(steps)):
        steps -= 1
    why = []
    if not fits_data(default):
        why.append(f"the training data gives {batches} batches (within limit_train_batches), fewer than its longest"
                   " round needs")
    if not fits_budget(default):
        why.append(f"the fit trains max_steps={max_steps} steps and the search trains at most as many")
    return steps, why


# -- per-module ranks ---------------------------------------------------------------------------------

def component_importance(
    lora_a: torch.Tensor, lora_b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor
) -> torch.Tensor:
    """First-order sensitivity of the loss to each rank component i (the pair ``A[i, :]``, ``B[:, i]``):
    ``|sum(A[i] * dL/dA[i]) + sum(B[:, i] * dL/dB[:, i])|``, the loss change a Taylor expansion
    predicts for removing the component (AdaLoRA's score, summed per component). Shape ``(r,)``."""
    return ((lora_a * grad_a).sum(dim=1) + (lora_b * grad_b).sum(dim=0)).abs()


def allocate_ranks(
    importance: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], budget: int
) -> dict[str, int]:
    """Per-module ranks with at most ``budget`` adapter parameters: every module keeps its most
    important component, then components are taken by importance per parameter (a component of a
    module costs ``in + out``) while they fit. A module's rank is the number of its components kept.
    """
    names = list(shapes)
    cost = {name: sum(shapes[name]) for name in names}
    floor = sum(cost.values())
    if budget < floor:
        raise ValueError(f"A budget of {budget:,} adapter parameters cannot give each of {len(names)} modules rank 1"
                         f" ({floor:,} parameters).")
    # Components by descending importance per parameter; within a module they come most important first.
    ranked = sorted(
        ((float(value) / cost[name], index, i, name) for index, name in enumerate(names)
         for i, value in enumerate(importance[name].tolist())),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    ranks = dict.fromkeys(names, 0)
    left = budget - floor
    for _, _, _, name in ranked:
        if ranks[name] == 0:
            ranks[name] = 1  # the module's best component, paid for by the floor
        elif cost[name] <= left:
            ranks[name] += 1
            left -= cost[name]
    return ranks


# -- adapter configurations -------------------------------------------------------------------------

def config_at_ranks(config: LoRAConfig, targets: Sequence[str], ranks: int | Mapping[str, int]) -> LoRAConfig:
    """``config`` with the given rank per target module (one int: all of them), alphas following the
    rank so every module's configured update scale holds: ``alpha / r`` is kept for LoRA, ``alpha``
    itself for rsLoRA (whose ``alpha / sqrt(r)`` is already its rank-stable scale).

    The result names every module explicitly (full names, longest first, so no key can shadow a
    longer name it is a suffix of); target selection is unchanged.
    """
    rank_of = {name: ranks if isinstance(ranks, int) else ranks[name] for name in targets}
    alpha_of = {
        name: config.alpha_for(name) * (1.0 if config.use_rslora else rank_of[name] / config.rank_for(name))
        for name in targets
    }
    order = sorted(targets, key=len, reverse=True)
    uniform = ranks if isinstance(ranks, int) else max(rank_of.values())
    return replace(
        config,
        r=uniform,
        alpha=config.alpha * (1.0 if config.use_rslora else uniform / config.r),
        rank_pattern={name: rank_of[name] for name in order},
        alpha_pattern={name: alpha_of[name] for name in order},
    )


def format_table(record: Mapping[str, Any]) -> str:
    """The trial table and the choice, as printed at the end of a search."""
    trials = record["trials"]
    last = max(t["round"] for t in trials)
    lines = [
        f"AdaptiveRankSearch: {len(trials)} trials in {last + 1} round(s), each scored on"
        f" {record['val_batches_per_trial']} validation batches; score = val loss + {record['penalty']:g} x params"
        " / params of the largest candidate",
        f"{'round':>5} {'rank':>6} {'params':>12} {'val loss':>10} {'score':>10} {'steps':>6} {'seconds':>8}",
    ]
    for trial in trials:
        mark = "  <-" if trial["round"] == last and trial["rank"] == record["rank"] else ""
        lines.append(
            f"{trial['round'] + 1:>5} {trial['rank']:>6} {trial['params']:>12,} {trial['val_loss']:>10.4f}"
            f" {trial['score']:>10.4f} {trial['steps']:>6} {trial['seconds']:>8.1f}{mark}"
        )
    lines.append(
        f"chosen rank {record['rank']}; search cost {record['trial_steps']} optimizer steps and"
        f" {record['val_batches']} validation batches, {record['trial_seconds']:.1f} s"
    )
    if record["per_module"]:
        by_kind: dict[str, list[int]] = {}
        for name, rank in record["ranks"].items():
            by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(rank)
        lines.append(f"per-module ranks within the budget of rank {record['rank']} ({record['params']:,} parameters),"
                     " in module order:")
        lines += [f"  {kind:<16} {' '.join(map(str, ranks))}" for kind, ranks in by_kind.items()]
    return "\n".join(lines)
