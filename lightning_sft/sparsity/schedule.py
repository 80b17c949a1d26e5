"""Where and when to sparsify: per-layer sparsity, presets, dense layers, dense warm-up, kept channel
counts. Pure Python (no Lightning, no tensors)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

LayerSpec = float | str | Mapping[int | str, float]
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def _check_sparsity(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"Sparsity {where} must be a number in [0, 1) (fraction of channels skipped), got {value!r}.")
    return float(value)


def _check_count(value: object, label: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}.")
    return value


# -- presets -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparsityPreset:
    """Per-layer sparsity of a reference configuration, for a model of ``num_layers`` layers."""

    num_layers: int
    mlp: Mapping[str, float]
    attn: Mapping[str, float]
    source: str


def _except_20_24(value: float, first: int) -> dict[str, float]:
    """The reference's attention ranges ``first``-29 skip layers 20 and 24."""
    return {f"{first}-19": value, "21-23": value, "25-29": value}


# From the SparseLoRA reference configs (configs/sparsity/*.yaml); all of them warm up dense for 5%.
PRESETS: dict[str, SparsityPreset] = {
    "llama3-8b-math10k": SparsityPreset(32, {"3-30": 0.99}, _except_20_24(0.75, 14), "llama3-8b-math10k.yaml"),
    "llama3-8b-commonsense": SparsityPreset(32, {"17-30": 0.97}, _except_20_24(0.2, 17), "llama3-8b-csr.yaml"),
    "llama2-7b-math10k": SparsityPreset(32, {"13-29": 0.9}, _except_20_24(0.6, 17), "llama2-7b-math10k.yaml"),
    "llama2-7b-commonsense": SparsityPreset(32, {"13-29": 0.9}, _except_20_24(0.5, 17), "llama2-7b-csr.yaml"),
}
PRESETS["llama2-7b"] = PRESETS["llama2-7b-math10k"]


def reference_layer(layer: int, num_layers: int, reference_layers: int) -> int:
    """The reference layer that ``layer`` of a ``num_layers``-deep model takes its sparsity from.

    Endpoint-aligned nearest neighbour: ``round_half_up(layer * (R - 1) / (L - 1))``, so the first
    and the last layers map to the reference's first and last (both dense in every preset) and
    relative depth is preserved in between. Identity when ``L == R``.
    """
    if num_layers == 1:
        return 0
    return math.floor(layer * (reference_layers - 1) / (num_layers - 1) + 0.5)


def preset(name: str, num_layers: int) -> tuple[list[float], list[float]]:
    """(mlp, attention) sparsity per layer of preset ``name``, rescaled to ``num_layers`` layers."""
    if name not in PRESETS:
        raise ValueError(f"Unknown sparsity preset {name!r}; valid: {', '.join(sorted(PRESETS))}.")
    _check_count(num_layers, "num_layers", 1)
    spec = PRESETS[name]
    parts = []
    for mapping in (spec.mlp, spec.attn):
        reference = _from_mapping(mapping, spec.num_layers)
        parts.append([reference[reference_layer(i, num_layers, spec.num_layers)] for i in range(num_layers)])
    return parts[0], parts[1]


# -- per-layer specs ---------------------------------------------------------------------------------


def _layers_of(key: int | str, num_layers: int) -> range:
    """Layer index (int or digit string) or inclusive "start-end" range string."""
    if isinstance(key, bool):
        raise ValueError(f"Invalid layer key {key!r}.")
    if isinstance(key, str):
        match = _RANGE.match(key)
        if match:
            start, end = int(match.group(1)), int(match.group(2))
        elif key.strip().isdigit():
            start = end = int(key)
        else:
            raise ValueError(f"Invalid layer key {key!r}: use a layer index or an inclusive range like '3-30'.")
    elif isinstance(key, int):
        start = end = key
    else:
        raise ValueError(f"Invalid layer key {key!r}: use a layer index or an inclusive range like '3-30'.")
    if not 0 <= start <= end < num_layers:
        raise ValueError(f"Layer key {key!r} is outside layers 0-{num_layers - 1} (or start > end).")
    return range(start, end + 1)


def _from_mapping(mapping: Mapping[int | str, float], num_layers: int) -> list[float]:
    """Unlisted layers stay dense; a layer listed twice (overlapping ranges) is an error."""
    values = [0.0] * num_layers
    seen: dict[int, int | str] = {}
    for key, value in mapping.items():
        value = _check_sparsity(value, f"of layers {key!r}")
        for layer in _layers_of(key, num_layers):
            if layer in seen:
                raise ValueError(f"Layer {layer} is set by both {seen[layer]!r} and {key!r}.")
            seen[layer] = key
            values[layer] = value
    return values


def resolve_layer_sparsity(
    spec: LayerSpec,
    num_layers: int,
    *,
    part: Literal["mlp", "attn"] = "mlp",
    dense_layers: Iterable[int] = (),
) -> list[float]:
    """Sparsity of every layer from a uniform float, a {layer or "start-end": float} mapping
    (unlisted layers dense) or a preset name (its ``part``), then ``dense_layers`` forced to 0.

    ``dense_layers`` takes indices; negative ones count from the end (``-1`` is the last layer).
    """
    _check_count(num_layers, "num_layers", 1)
    if part not in ("mlp", "attn"):
        raise ValueError(f"part must be 'mlp' or 'attn', got {part!r}.")
    if isinstance(spec, str):
        mlp, attn = preset(spec, num_layers)
        values = mlp if part == "mlp" else attn
    elif isinstance(spec, Mapping):
        values = _from_mapping(spec, num_layers)
    else:
        values = [_check_sparsity(spec, "spec")] * num_layers
    for layer in dense_layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer < num_layers:
            raise ValueError(f"dense_layers holds {layer!r}, not a layer index in [{-num_layers}, {num_layers}).")
        values[layer] = 0.0
    return values


def kept_channels(total: int, sparsity: float, multiple_of: int = 1) -> int:
    """Channels kept out of ``total`` at ``sparsity``: ``int(total * (1 - sparsity))`` as in the
    reference, rounded down to a multiple of ``multiple_of`` (structured selections, alignment),
    but never below ``multiple_of`` (at least one channel)."""
    _check_count(total, "total", 1)
    _check_count(multiple_of, "multiple_of", 1)
    sparsity = _check_sparsity(sparsity, "for kept_channels")
    if total % multiple_of:
        raise ValueError(f"total={total} is not a multiple of multiple_of={multiple_of}.")
    kept = int(total * (1 - sparsity))
    return max(multiple_of, kept - kept % multiple_of)


# -- dense warm-up -----------------------------------------------------------------------------------


def dense_warmup_steps(total_steps: int | None, dense_warmup: float | int) -> int:
    """Number of initial dense steps: an int is a step count; a float in [0, 1) is a fraction of
    ``total_steps`` (rounded to the nearest step)."""
    if isinstance(dense_warmup, bool) or not isinstance(dense_warmup, (int, float)):
        raise ValueError(f"dense_warmup must be an int (steps) or a float fraction in [0, 1), got {dense_warmup!r}.")
    if isinstance(dense_warmup, int):
        return _check_count(dense_warmup, "dense_warmup (steps)")
    if not 0.0 <= dense_warmup < 1.0:
        raise ValueError(f"dense_warmup as a fraction must be in [0, 1), got {dense_warmup!r}; pass an int for steps.")
    if dense_warmup == 0.0:
        return 0
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(
            f"A fractional dense_warmup needs the total number of steps (an int >= 1), got {total_steps!r}; "
            "set Trainer(max_steps=...) or pass dense_warmup as a number of steps."
        )
    return round(dense_warmup * total_steps)


def is_dense_step(step: int, total_steps: int | None, dense_warmup: float | int) -> bool:
    """Whether optimizer step ``step`` (0-based) runs dense because it is still in the warm-up."""
    _check_count(step, "step")
    return step < dense_warmup_steps(total_steps, dense_warmup)
