"""The model families contextual sparsity knows: one ``MLPLayout`` or ``AttentionLayout`` entry per
family layout (child names, which part of a fused weight is which, the q/k/v packing).

A new family is one entry in ``MLP_LAYOUTS`` or ``ATTENTION_LAYOUTS``; ``channels.describe``
matches them against every module. Where attention rows sit in a fused q/k/v weight is the
layout's *packing*: ``separate``, ``concatenated`` ([q | k | v]) or ``grouped`` (per kv group
``[q_0 .. q_{G-1}, k, v]``, GPT-NeoX/BLOOM/Falcon).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

Packing = Literal["separate", "concatenated", "grouped"]


@dataclass(frozen=True)
class Part:
    """Producer ``chunk`` of ``chunks`` equal parts of projection ``path``'s output rows."""

    path: str
    chunk: int = 0
    chunks: int = 1


@dataclass(frozen=True)
class MLPLayout:
    """An MLP: ``producers`` (gate then up, or fc1), the ``consumer``, the ``activation`` module.

    ``exact``: the module's children are exactly these (plus ``optional`` elementwise ones such as
    dropout), so its forward is the MLP alone and may run on compact intermediates; otherwise the
    projections sit in a larger module (a decoder or encoder layer) and are made sparse in place.
    ``config`` lists settings the layout needs (attribute, required value).
    """

    name: str
    families: str
    producers: tuple[Part, ...]
    consumer: str
    activation: str
    optional: tuple[str, ...] = ()
    exact: bool = True
    config: tuple[tuple[str, object], ...] = ()

    def paths(self) -> list[str]:
        return [*dict.fromkeys(p.path for p in self.producers), self.consumer, self.activation]

    def matches(self, module: nn.Module) -> bool:
        if not all(isinstance(_get(module, path), nn.Module) for path in self.paths()):
            return False
        if not self.exact:
            return True
        children = {name for name, _ in module.named_children()}
        required = {path.split(".")[0] for path in self.paths()}
        own = next(module.parameters(recurse=False), None) is not None
        return required <= children <= required | set(self.optional) and not own


def _query_key_value_packing(config: Any) -> Packing:
    """One fused query_key_value: Falcon-7B's multi-query packs [q | k | v]; GPT-NeoX, BLOOM and
    Falcon's multi-head and new decoder architectures pack per kv group."""
    multi_query = getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False)
    return "concatenated" if multi_query else "grouped"


@dataclass(frozen=True)
class AttentionLayout:
    """An attention block: its q, k, v projections (one path for a fused one), o projection and packing."""

    name: str
    families: str
    qkv: tuple[str, str, str]
    o: str
    packing: Packing | Callable[[Any], Packing] = "separate"

    def paths(self) -> list[str]:
        return [*dict.fromkeys(self.qkv), self.o]

    def matches(self, module: nn.Module) -> bool:
        return all(isinstance(_get(module, path), nn.Module) for path in self.paths())

    def packing_for(self, config: Any) -> Packing:
        return self.packing(config) if callable(self.packing) else self.packing


MLP_LAYOUTS: tuple[MLPLayout, ...] = (
    MLPLayout("gated", "LLaMA, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3", (Part("gate_proj"), Part("up_proj")),
              "down_proj", "act_fn"),
    MLPLayout("gated, fused gate_up_proj", "Phi-3", (Part("gate_up_proj", 0, 2), Part("gate_up_proj", 1, 2)),
              "down_proj", "activation_fn"),
    MLPLayout("c_fc/c_proj", "GPT-2, StarCoder2", (Part("c_fc"),), "c_proj", "act", optional=("dropout",)),
    MLPLayout("dense_h_to_4h/dense_4h_to_h", "GPT-NeoX, Falcon", (Part("dense_h_to_4h"),), "dense_4h_to_h", "act"),
    MLPLayout("dense_h_to_4h/gelu_impl", "BLOOM", (Part("dense_h_to_4h"),), "dense_4h_to_h", "gelu_impl",
              config=(("pretraining_tp", 1),)),
    MLPLayout("fc_in/fc_out", "GPT-J", (Part("fc_in"),), "fc_out", "act", optional=("dropout",)),
    MLPLayout("fc1/fc2", "Phi", (Part("fc1"),), "fc2", "activation_fn"),
    MLPLayout("fc1/fc2 in a decoder layer", "OPT", (Part("fc1"),), "fc2", "activation_fn", exact=False),
    MLPLayout("intermediate/output", "BERT", (Part("intermediate.dense"),), "output.dense",
              "intermediate.intermediate_act_fn", exact=False, config=(("chunk_size_feed_forward", 0),)),
)

ATTENTION_LAYOUTS: tuple[AttentionLayout, ...] = (
    AttentionLayout("q/k/v/o_proj", "LLaMA, Mistral, Qwen2, Qwen3, Gemma 1-3, StarCoder2, Mixtral",
                    ("q_proj", "k_proj", "v_proj"), "o_proj"),
    AttentionLayout("q/k/v_proj, out_proj", "OPT, GPT-J", ("q_proj", "k_proj", "v_proj"), "out_proj"),
    AttentionLayout("q/k/v_proj, dense", "Phi", ("q_proj", "k_proj", "v_proj"), "dense"),
    AttentionLayout("fused qkv_proj", "Phi-3", ("qkv_proj",) * 3, "o_proj", "concatenated"),
    AttentionLayout("fused c_attn (Conv1D)", "GPT-2", ("c_attn",) * 3, "c_proj", "concatenated"),
    AttentionLayout("fused query_key_value", "GPT-NeoX, BLOOM, Falcon", ("query_key_value",) * 3, "dense",
                    _query_key_value_packing),
    AttentionLayout("self.query/key/value, output.dense", "BERT", ("self.query", "self.key", "self.value"),
                    "output.dense"),
)


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
    return module
