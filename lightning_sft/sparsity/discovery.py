"""Finding the MLPs and attention modules a sparsity plan applies to, by structure.

* gated MLP: any module with ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` children
  (LLaMA, Qwen2, Mistral, Gemma);
* plain MLP: a module whose children are exactly one of ``SparsePlainMLP.layouts`` (GPT-2
  ``c_fc``/``c_proj``/``act``, GPT-NeoX ``dense_h_to_4h``/``dense_4h_to_h``/``act``, GPT-J
  ``fc_in``/``fc_out``/``act``, Phi ``fc1``/``fc2``/``activation_fn``, ...): exactly, so that a
  decoder layer holding fc1/fc2 next to its attention (OPT, BART) is not taken for one;
* BERT-style MLP: a layer with an ``intermediate`` (``dense`` + ``intermediate_act_fn``) and an
  ``output`` with a ``dense`` projection (BERT, RoBERTa, ELECTRA, ...); the layer is the target;
* attention: a module with ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``.

They are returned in module order, which is depth order for transformer stacks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_sft.sparsity.sparse_mlp import (
    SparseBertMLP,
    SparsePlainMLP,
    SparsityState,
    wrap_bert_mlps,
    wrap_gated_mlps,
    wrap_plain_mlps,
)

_GATED = ("gate_proj", "up_proj", "down_proj", "act_fn")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_WRAPPERS: dict[str, Callable[..., list[str]]] = {
    "gated": wrap_gated_mlps,
    "plain": wrap_plain_mlps,
    "bert": wrap_bert_mlps,
}


@dataclass(frozen=True)
class SparsityTargets:
    """What ``find_targets`` found: one kind of MLP (the wrapper to use) and the attention modules."""

    mlp_kind: str | None  # "gated", "plain", "bert" or None
    mlps: list[tuple[str, nn.Module]]  # BERT-style: the layers holding intermediate and output
    attentions: list[tuple[str, nn.Module]]

    def wrap_mlps(
        self,
        model: nn.Module,
        state: SparsityState,
        strategy: str,
        sparsity_per_layer: Sequence[float],
        **estimator_options: object,
    ) -> list[str]:
        """``self.mlps`` wrapped by their kind's ``wrap_*_mlps``; returns the wrapped names."""
        if self.mlp_kind is None:
            raise ValueError("These targets hold no MLP to wrap.")
        return _WRAPPERS[self.mlp_kind](model, state, strategy, sparsity_per_layer, self.mlps, **estimator_options)


def _has(module: nn.Module, children: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(module, child, None), nn.Module) for child in children)


def find_targets(model: nn.Module) -> SparsityTargets:
    """The model's MLPs and attention modules; a clear error when it has neither."""
    modules = [(name, module) for name, module in model.named_modules() if name]
    found = {
        "gated": [(n, m) for n, m in modules if _has(m, _GATED)],
        "plain": [(n, m) for n, m in modules if SparsePlainMLP.layout_of(m) is not None],
        "bert": [(n, m) for n, m in modules if SparseBertMLP.holds(m)],
    }
    attentions = [(n, m) for n, m in modules if _has(m, _ATTENTION)]
    kinds = [kind for kind, mlps in found.items() if mlps]
    if len(kinds) > 1:
        examples = ", ".join(f"{kind} ({found[kind][0][0]})" for kind in kinds)
        raise TypeError(
            f"{type(model).__name__} mixes MLP kinds: {examples}; contextual sparsity needs one kind per model."
        )
    if not (kinds or attentions):
        layouts = "; ".join(str(layout) for layout in SparsePlainMLP.layouts)
        raise TypeError(
            f"{type(model).__name__} has no recognisable MLP (gated: {', '.join(_GATED)}; plain: {layouts};"
            " BERT-style: intermediate.dense + intermediate.intermediate_act_fn and output.dense) or attention"
            f" ({', '.join(_ATTENTION)}) modules, so contextual sparsity has nothing to apply to."
        )
    kind = kinds[0] if kinds else None
    return SparsityTargets(kind, found[kind] if kind else [], attentions)
