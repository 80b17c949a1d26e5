"""Timing helpers for benchmarks that compare several variants in one process.

Timing variants one after another lets a slow patch of the machine (another job, frequency
scaling, memory pressure) land on only one of them. Running one step of each variant in turn
(ABAB...) after a common warm-up spreads such noise over all of them alike, and the median and
interquartile range ignore the odd outlier step that a mean would absorb. Per-round ratios of two
variants cancel load bursts further still.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Robust summary of one variant's step times, in seconds."""

    median: float
    q1: float
    q3: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def summarize(samples: Sequence[float]) -> Summary:
    """Median and quartiles (inclusive method, so a quartile never lies outside the samples)."""
    if not samples:
        raise ValueError("No samples to summarize: run at least one timed step.")
    if len(samples) == 1:
        return Summary(samples[0], samples[0], samples[0], 1)
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return Summary(median, q1, q3, len(samples))


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios of two interleaved variants.

    Steps of one round run back to back, so a burst of machine load inflates both; their ratio
    cancels much of it, which a ratio of separate medians does not.
    """
    if len(numerator) != len(denominator):
        raise ValueError(f"Paired samples must have equal lengths; got {len(numerator)} and {len(denominator)}.")
    return [a / b for a, b in zip(numerator, denominator)]


def time_call(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Wall time of one call of ``fn``.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after, so work queued on an
    asynchronous device is charged to the call that queued it.
    """
    if sync is not None:
        sync()
    start = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def interleaved(
    variants: Mapping[str, Callable[[], object]],
    steps: int,
    warmup: int = 0,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Step times per variant: ``warmup`` untimed rounds, then ``steps`` timed rounds.

    A round calls every variant once, in mapping order, so the variants alternate (ABAB...).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"Need steps >= 1 and warmup >= 0; got steps={steps}, warmup={warmup}.")
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(steps):
        for name, fn in variants.items():
            times[name].append(time_call(fn, sync))
    return times
