"""Finding the MLPs and attention modules a sparsity plan applies to, by structure.

A gated MLP is any module with ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` children
(LLaMA, Qwen2, Mistral, Gemma); a plain MLP one with ``c_fc``, ``c_proj`` and ``act`` (GPT-2); an
attention module one with ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``. They are returned in
module order, which is depth order for transformer stacks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_GATED = ("gate_proj", "up_proj", "down_proj", "act_fn")
_PLAIN = ("c_fc", "c_proj", "act")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class SparsityTargets:
    mlp_kind: str | None  # "gated", "plain" or None
    mlps: list[tuple[str, nn.Module]]
    attentions: list[tuple[str, nn.Module]]


def _has(module: nn.Module, children: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(module, child, None), nn.Module) for child in children)


def find_targets(model: nn.Module) -> SparsityTargets:
    """The model's MLPs and attention modules; a clear error when it has neither."""
    gated = [(n, m) for n, m in model.named_modules() if n and _has(m, _GATED)]
    plain = [(n, m) for n, m in model.named_modules() if n and _has(m, _PLAIN) and not _has(m, _GATED)]
    attentions = [(n, m) for n, m in model.named_modules() if n and _has(m, _ATTENTION)]
    if gated and plain:
        raise TypeError(f"{type(model).__name__} mixes gated and plain MLPs; contextual sparsity needs one kind.")
    if not (gated or plain or attentions):
        raise TypeError(
            f"{type(model).__name__} has no recognisable MLP ({', '.join(_GATED)} or {', '.join(_PLAIN)}) or"
            f" attention ({', '.join(_ATTENTION)}) modules, so contextual sparsity has nothing to apply to."
        )
    kind = "gated" if gated else "plain" if plain else None
    return SparsityTargets(kind, gated or plain, attentions)
