"""Non-IID client partitions of a labelled dataset: Dirichlet label skew over its skills.

Pure Python. For every skill (label) a share vector over the clients is drawn from Dirichlet(alpha)
and that skill's examples are cut into consecutive chunks by it (the usual label-skew benchmark:
small alpha, each client sees mostly a few skills; large alpha, close to IID). The same shares cut
the train, validation and test splits, so each client's held-out data follows its own mix, which
is what personalised accuracy measures.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TypeVar

from lightning_sft.validation import check_int

T = TypeVar("T")


def dirichlet_shares(skills: Sequence[str], num_clients: int, alpha: float, seed: int) -> dict[str, list[float]]:
    """For each skill, the share of its examples each client gets (sums to 1)."""
    check_int(num_clients, "num_clients", 1, "A federation needs at least one client.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"`alpha` must be > 0; got {alpha!r}. 0.1 is strongly non-IID, 100 nearly IID.")
    rng = random.Random(seed)
    shares = {}
    for skill in sorted(skills):
        draws = [rng.gammavariate(alpha, 1.0) for _ in range(num_clients)]
        total = sum(draws) or 1.0
        shares[skill] = [d / total for d in draws]
    return shares


def split_by_shares(items: Sequence[T], skill_of: Sequence[str], shares: Mapping[str, Sequence[float]]) -> list[list[T]]:
    """Cut each skill's items (in order) into one chunk per client by ``shares``; each client's items keep
    their original order, so its skills stay interleaved as they were."""
    num_clients = len(next(iter(shares.values())))
    by_skill: dict[str, list[int]] = {}
    for index, skill in enumerate(skill_of):
        if skill not in shares:
            raise ValueError(f"Skill {skill!r} has no shares; known: {sorted(shares)}.")
        by_skill.setdefault(skill, []).append(index)
    if len(skill_of) != len(items):
        raise ValueError(f"{len(items)} items but {len(skill_of)} skills.")
    chosen: list[list[int]] = [[] for _ in range(num_clients)]
    for skill, members in by_skill.items():
        bounds, cumulative = [0], 0.0
        for share in shares[skill]:
            cumulative += share
            bounds.append(round(cumulative * len(members)))
        bounds[-1] = len(members)
        for client in range(num_clients):
            chosen[client].extend(members[bounds[client] : bounds[client + 1]])
    return [[items[i] for i in sorted(indices)] for indices in chosen]
