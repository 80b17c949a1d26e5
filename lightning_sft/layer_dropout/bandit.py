"""Discounted UCB over drop rates: the online configurator behind ``LayerDropout(rate="auto")``.

Pure Python. Each arm is a drop rate; pulling it runs one window of training steps at that rate, and
the reward is the window's decrease of a fixed probe loss per wall-clock second. That reward is
non-stationary (every arm's loss decrease per second shrinks as training converges), so plain UCB1,
which averages all of an arm's history, would favour whichever arm happened to run early. Discounted
UCB (Garivier & Moulines, 2011) weighs a reward observed ``k`` decisions ago by ``discount ** k``:
old evidence fades, an arm that has not run for a while regains its exploration bonus and is
re-measured at the current stage of training.

    index(i) = S_i / N_i + exploration * spread * sqrt(log(sum_j N_j) / N_i)

with ``N_i``, ``S_i`` the discounted pull count and reward sum of arm ``i`` and ``spread`` the range
of the rewards seen so far (rewards are in loss per second, whose scale depends on the model and the
machine, so the bonus must be in the same units). Untried arms go first, in order; ties go to the
lower index (the lower drop rate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_sft.layer_dropout.schedules import validate_rate


class DiscountedUCB:
    """A discounted-UCB bandit over ``len(arms)`` arms; ``select()`` then ``update(arm, reward)``."""

    def __init__(self, num_arms: int, discount: float = 0.9, exploration: float = 1.0) -> None:
        if isinstance(num_arms, bool) or not isinstance(num_arms, int) or num_arms < 1:
            raise ValueError(f"A bandit needs at least one arm; got num_arms={num_arms!r}.")
        if isinstance(discount, bool) or not isinstance(discount, (int, float)) or not 0.0 < discount <= 1.0:
            raise ValueError(
                f"`discount` must be in (0, 1]; got {discount!r}. 1 is plain UCB1 (no forgetting); 0.8-0.95 suits"
                " rewards that drift as training converges."
            )
        if isinstance(exploration, bool) or not isinstance(exploration, (int, float)) or exploration < 0:
            raise ValueError(f"`exploration` must be a number >= 0; got {exploration!r}. 1 is the usual UCB bonus.")
        self.num_arms = num_arms
        self.discount = float(discount)
        self.exploration = float(exploration)
        self.counts = [0.0] * num_arms  # discounted pulls
        self.sums = [0.0] * num_arms  # discounted reward sums
        self.pulls = [0] * num_arms  # undiscounted, for reporting
        self.low = math.inf
        self.high = -math.inf

    def means(self) -> list[float | None]:
        return [s / n if n > 0 else None for s, n in zip(self.sums, self.counts)]

    def indices(self) -> list[float]:
        """The UCB index of every arm (``inf`` for an untried one)."""
        total = sum(self.counts)
        spread = self.high - self.low if self.high > self.low else 1.0
        return [
            math.inf if n == 0 else s / n + self.exploration * spread * math.sqrt(max(math.log(total), 0.0) / n)
            for s, n in zip(self.sums, self.counts)
        ]

    def select(self) -> int:
        """The arm with the highest index; the lowest such index on ties."""
        indices = self.indices()
        return max(range(self.num_arms), key=lambda i: (indices[i], -i))

    def update(self, arm: int, reward: float) -> None:
        if not 0 <= arm < self.num_arms:
            raise IndexError(f"arm {arm} out of range for {self.num_arms} arms")
        if not math.isfinite(reward):
            raise ValueError(f"A bandit reward must be finite; got {reward!r}.")
        self.counts = [n * self.discount for n in self.counts]
        self.sums = [s * self.discount for s in self.sums]
        self.counts[arm] += 1.0
        self.sums[arm] += reward
        self.pulls[arm] += 1
        self.low, self.high = min(self.low, reward), max(self.high, reward)

    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": list(self.counts), "sums": list(self.sums), "pulls": list(self.pulls),
            "low": self.low, "high": self.high,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("counts", "sums", "pulls"):
            if len(state[key]) != self.num_arms:
                raise ValueError(
                    f"The checkpoint's bandit has {len(state[key])} arms, this one {self.num_arms}; resume with the"
                    " same `arms`."
                )
        self.counts = [float(v) for v in state["counts"]]
        self.sums = [float(v) for v in state["sums"]]
        self.pulls = [int(v) for v in state["pulls"]]
        self.low, self.high = float(state["low"]), float(state["high"])


def validate_arms(arms: Any) -> tuple[float, ...]:
    """The candidate drop rates of ``rate="auto"``: distinct numbers in [0, 1), ascending."""
    if isinstance(arms, (str, bytes)) or not isinstance(arms, Sequence) or len(arms) < 2:
        raise ValueError(f"`arms` must list at least two drop rates, e.g. (0.0, 0.2, 0.4); got {arms!r}.")
    rates = sorted(validate_rate(a, "arms") for a in arms)
    if len(set(rates)) != len(rates):
        raise ValueError(f"`arms` repeats a rate: {list(arms)}; list each once.")
    return tuple(rates)
