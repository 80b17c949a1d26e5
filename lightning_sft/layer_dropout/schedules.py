"""Per-block drop probabilities of stochastic layer dropout: shape over depth, ramp over steps.

Pure Python (no torch, no Lightning). ``rate`` is the *expected fraction of the droppable blocks
skipped* in a step, whatever the schedule: the schedule only decides where in depth the drops fall,
so ``rate`` maps directly to the compute saved and schedules compare at equal cost.

* ``uniform``: every droppable block has probability ``rate``;
* ``linear``: proportional to depth ``(l + 1) / L`` (stochastic depth), deeper blocks drop more;
* ``exponential``: proportional to ``exp(l ln2 / (L - 1)) - 1`` (LayerSkip), near zero for the first
  blocks and steepest at the top;
* ``progressive``: linear in depth, with the rate ramped in over steps as progressive layer dropping
  does: ``rate(t) = rate * (1 - exp(-gamma * t))``, so early steps, where the adapters move most,
  run (nearly) dense.

The shape is evaluated at the absolute depth ``l`` of each block in its stack of ``L``; the
``protect_first`` / ``protect_last`` blocks get 0 and the others are scaled so their mean is the rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Schedule:
    """Where in depth a schedule drops (``shape(depth, num_blocks)``, unnormalised) and whether its rate
    ramps in over steps."""

    shape: Callable[[int, int], float]
    ramped: bool = False


def _exponential(depth: int, num_blocks: int) -> float:
    return 1.0 if num_blocks == 1 else math.exp(depth * math.log(2.0) / (num_blocks - 1)) - 1.0


def _linear(depth: int, num_blocks: int) -> float:
    return (depth + 1) / num_blocks


# The schedules by name; a new one is one entry.
SCHEDULES: dict[str, Schedule] = {
    "uniform": Schedule(lambda depth, num_blocks: 1.0),
    "linear": Schedule(_linear),
    "exponential": Schedule(_exponential),
    "progressive": Schedule(_linear, ramped=True),
}
# A block is never dropped with certainty: it would never train, and DDP would see it unused.
MAX_PROBABILITY = 0.95
DEFAULT_GAMMA = 0.001


def validate_rate(rate: Any, name: str = "rate") -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(
            f"`{name}` must be a number in [0, 1), the expected fraction of droppable blocks skipped per step;"
            f" got {rate!r}. Typical values are 0.1-0.5 (or rate='auto' to let a bandit choose)."
        )
    return float(rate)


def validate_schedule(schedule: Any) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown layer-dropout schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    return schedule


def depth_shape(schedule: str, depth: int, num_blocks: int) -> float:
    """Unnormalised drop weight of the block at ``depth`` (0-based) in a stack of ``num_blocks``."""
    return SCHEDULES[schedule].shape(depth, num_blocks)


def check_protection(num_blocks: int, protect_first: int, protect_last: int, where: str) -> None:
    if protect_first + protect_last >= num_blocks:
        raise ValueError(
            f"{where} has {num_blocks} blocks, and protect_first={protect_first} + protect_last={protect_last}"
            f" protects all of them, so none can be dropped. Protect at most {num_blocks - 1} in total."
        )


def drop_probabilities(
    schedule: str, rate: float, num_blocks: int, protect_first: int, protect_last: int
) -> list[float]:
    """Drop probability of each block of one stack; the droppable ones average ``rate``.

    Raises if the schedule would need a probability above ``MAX_PROBABILITY`` for some block, naming
    the largest rate this schedule and stack allow.
    """
    check_protection(num_blocks, protect_first, protect_last, "The layer stack")
    eligible = range(protect_first, num_blocks - protect_last)
    weights = [depth_shape(schedule, depth, num_blocks) if depth in eligible else 0.0 for depth in range(num_blocks)]
    total = sum(weights)
    if total == 0.0:  # exponential with only the first block eligible: fall back to uniform
        weights = [1.0 if depth in eligible else 0.0 for depth in range(num_blocks)]
        total = float(len(eligible))
    scale = rate * len(eligible) / total
    probabilities = [w * scale for w in weights]
    if max(probabilities) > MAX_PROBABILITY:
        limit = MAX_PROBABILITY * total / (len(eligible) * max(weights))
        raise ValueError(
            f"rate={rate:g} with the {schedule!r} schedule over {num_blocks} blocks would drop the deepest droppable"
            f" block with probability {max(probabilities):.2f} (> {MAX_PROBABILITY}). Use rate <= {limit:.3f},"
            " a flatter schedule ('uniform'), or fewer protected blocks."
        )
    return probabilities


def progressive_factor(step: int, gamma: float) -> float:
    """The fraction of the target rate reached after ``step`` optimizer steps: ``1 - exp(-gamma t)``."""
    return 1.0 - math.exp(-gamma * step)


def rate_at(schedule: str, rate: float, step: int, gamma: float) -> float:
    """The rate in force at ``step``: constant except for the progressive ramp."""
    return rate * progressive_factor(step, gamma) if SCHEDULES[schedule].ramped else rate


def expected_drop_fraction(probabilities: Sequence[Sequence[float]]) -> float:
    """Expected fraction of all blocks (protected included) skipped per step, over every stack."""
    flat = [p for stack in probabilities for p in stack]
    return sum(flat) / len(flat) if flat else 0.0


def check_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(
            f"`compute_budget` must be a number in (0, 1], the largest expected fraction of the blocks' compute a"
            f" step may run; got {budget!r}. 0.7 lets a device skip at least 30% of its block computations."
        )
    return float(budget)


def rates_within_budget(
    rates: Sequence[float], budget: float, schedule: str, stack_sizes: Sequence[int], protect_first: int, protect_last: int
) -> tuple[float, ...]:
    """The ``rates`` whose expected block compute, ``1 - expected_drop_fraction``, is at most ``budget``.

    Raises, naming the smallest rate the budget needs, when none is; a progressive schedule starts
    dense, so it has no budget.
    """
    if SCHEDULES[schedule].ramped:
        raise ValueError(
            f"A compute budget needs a schedule whose rate holds from the first step; {schedule!r} starts dense."
            " Use 'linear' (the same shape in depth) or drop the budget."
        )

    def compute(rate: float) -> float:
        stacks = [drop_probabilities(schedule, rate, size, protect_first, protect_last) for size in stack_sizes]
        return 1.0 - expected_drop_fraction(stacks)

    fitting = tuple(rate for rate in rates if compute(rate) <= budget + 1e-9)
    if not fitting:
        droppable = sum(size - protect_first - protect_last for size in stack_sizes) / sum(stack_sizes)
        needed = (1.0 - budget) / droppable if droppable > 0 else math.inf
        raise ValueError(
            f"No drop rate among {[f'{r:g}' for r in rates]} keeps the expected block compute within compute_budget="
            f"{budget:g}: with {protect_first}+{protect_last} protected blocks per stack of {list(stack_sizes)}, the"
            f" budget needs rate >= {needed:.3f}. Add such a rate, protect fewer blocks, or raise the budget."
        )
    return fitting
