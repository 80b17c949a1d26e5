"""Personalized layer sharing: which adapter tensors a client shares and which stay on the client.

Pure torch (no Lightning, no Flower). Adapters are grouped by the transformer block they live in
(an adapter outside every block, such as one on ``lm_head``, is its own group); a group is shared
(averaged across clients by the server) or personal (kept in each client's state, never sent).

The split is given by :class:`PersonalLayers`:

* ``"none"``: every group is shared (plain FedAvg of the adapters);
* ``"last:K"`` / ``"first:K"``: the top / bottom K blocks of every stack are personal (FedPer-style:
  upper layers hold the client-specific part);
* a list of regular expressions: tensors whose full parameter name matches any are personal
  (``["lora_B"]`` keeps every B matrix personal, as FedSA-LoRA does);
* ``"auto"``: round 1 shares everything (the probe round); the server then measures, per group, how
  much of the clients' updates agree (:func:`excess_agreement`: 0 for unrelated updates, 1 for
  identical ones) and makes the groups below a threshold personal (:func:`choose_personal`), once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_sft.adapters.injection import lora_layers
from lightning_sft.anatomy.stacks import find_stacks

_COUNT = re.compile(r"^(first|last):(\d+)$")
DEFAULT_AGREEMENT = 0.5


def adapter_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every LoRA tensor of ``module`` by full parameter name, detached on the CPU."""
    layers = lora_layers(module)
    if not layers:
        raise ValueError(
            "Federated fine-tuning exchanges LoRA adapter weights, and this model has none: add LoRA(...) to the"
            " client callbacks."
        )
    return {
        f"{name}.{part}": getattr(layer, part).detach().cpu().clone()
        for name, layer in layers.items()
        for part in ("lora_A", "lora_B")
    }


def adapter_groups(module: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """The group (the enclosing block's dotted name, else the adapter's module name) of each tensor name."""
    blocks = [f"{stack}.{index}" for stack, layers in find_stacks(module) for index in range(len(layers))]
    groups = {}
    for name in names:
        owner = name.rsplit(".", 1)[0]
        groups[name] = next((block for block in blocks if owner.startswith(f"{block}.")), owner)
    return groups


def block_positions(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Each block's ``(index, stack length)``, for the first/last rules."""
    return {f"{stack}.{i}": (i, len(layers)) for stack, layers in find_stacks(module) for i in range(len(layers))}


@dataclass(frozen=True)
class PersonalLayers:
    """A validated personal-layer rule; see the module docstring for the forms."""

    rule: str | tuple[str, ...]

    @classmethod
    def parse(cls, spec: str | Sequence[str] | None) -> PersonalLayers:
        if spec is None or spec == "none":
            return cls("none")
        if spec == "auto" or (isinstance(spec, str) and _COUNT.match(spec)):
            return cls(spec)
        if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec:
            raise ValueError(
                f"`personal` must be 'none', 'auto', 'last:K', 'first:K' or a list of regular expressions over"
                f" adapter parameter names (e.g. ['lora_B']); got {spec!r}."
            )
        for pattern in spec:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(f"`personal` pattern {pattern!r} is not a regular expression: {error}.") from None
        return cls(tuple(spec))

    @property
    def automatic(self) -> bool:
        return self.rule == "auto"

    def personal_names(self, groups: Mapping[str, str], positions: Mapping[str, tuple[int, int]]) -> set[str]:
        """The tensor names this rule makes personal before any round (none yet for ``auto``)."""
        if self.rule in ("none", "auto"):
            return set()
        if isinstance(self.rule, tuple):
            patterns = [re.compile(p) for p in self.rule]
            chosen = {name for name in groups if any(p.search(name) for p in patterns)}
        else:
            side, count = _COUNT.match(self.rule).groups()  # type: ignore[union-attr]
            k = int(count)

            def picked(group: str) -> bool:
                if group not in positions:
                    return False
                index, length = positions[group]
                return index >= length - k if side == "last" else index < k

            chosen = {name for name, group in groups.items() if picked(group)}
        if not chosen:
            raise ValueError(f"`personal={self.rule!r}` matches no adapter tensor; names look like {next(iter(groups))!r}.")
        if len(chosen) == len(groups):
            raise ValueError(f"`personal={self.rule!r}` makes every adapter personal, leaving nothing to share.")
        return chosen


def agreement(deltas: Sequence[Tensor], weights: Sequence[float]) -> float:
    """The fraction of the clients' update energy that is common: ``|sum w_c d_c|^2 / sum w_c |d_c|^2``.

    ``weights`` are normalised to sum to 1. It is 1 when every client moved the same way, about
    ``1 / clients`` when they moved in unrelated directions, 0 when they cancel out (and 1 for no update).
    """
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("agreement needs a positive total weight.")
    w = [float(x) / total for x in weights]
    mean = sum(wi * d.double() for wi, d in zip(w, deltas))
    energy = sum(wi * float(d.double().pow(2).sum()) for wi, d in zip(w, deltas))
    return 1.0 if energy == 0 else float(mean.pow(2).sum()) / energy  # type: ignore[union-attr]


def excess_agreement(deltas: Sequence[Tensor], weights: Sequence[float]) -> float:
    """:func:`agreement` rescaled so that 0 is what unrelated updates give and 1 is identical updates.

    Unrelated (orthogonal, equal-norm) updates give ``agreement = sum w_c^2`` (normalised weights),
    ``1 / clients`` for equal weights, so the raw value means different things for 2 and 20 clients;
    ``(agreement - chance) / (1 - chance)`` does not. One client (chance 1) counts as full agreement.
    """
    total = float(sum(weights))
    chance = sum((float(w) / total) ** 2 for w in weights)
    if chance >= 1.0:
        return 1.0
    return (agreement(deltas, weights) - chance) / (1.0 - chance)


def choose_personal(
    groups: Mapping[str, str],
    deltas: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    threshold: float = DEFAULT_AGREEMENT,
) -> tuple[set[str], dict[str, float]]:
    """Tensor names to make personal, and each group's excess agreement: groups below ``threshold``
    (less than that far from unrelated towards identical updates) go personal.

    If every group would, the one that agrees most stays shared, so something is still averaged.
    """
    members: dict[str, list[str]] = {}
    for name, group in groups.items():
        members.setdefault(group, []).append(name)
    scores = {
        group: excess_agreement([torch.cat([d[n].flatten() for n in names]) for d in deltas], weights)
        for group, names in members.items()
    }
    personal = {group for group, score in scores.items() if score < threshold}
    if len(personal) == len(scores):
        personal.discard(max(scores, key=scores.__getitem__))
    return {name for group in personal for name in members[group]}, scores
