"""The channel groups of a model's MLP and attention blocks, found by structure.

A *channel group* is a set of intermediate channels chosen together: its *producers* are output
rows of projections that compute a channel, its *consumers* are input columns of projections
that read it. A fused projection is simply several producer slices of one weight:

* gated MLP: channel ``i`` is row ``i`` of gate and up (of ``gate_up_proj``: rows ``i`` and
  ``I + i``) and column ``i`` of down;
* plain MLP: row ``i`` of fc1, column ``i`` of fc2;
* attention, two groups over the kv channels ``(g, d)`` (kv head ``g``, dim ``d``): ``qk`` is row
  ``(g, d)`` of k and rows ``(h, d)`` of q for every query head ``h`` of group ``g`` (GQA);
  ``v`` is row ``(g, d)`` of v and columns ``(h, d)`` of o. Where those rows sit in a fused
  q/k/v weight is the layout's *packing*: ``separate``, ``concatenated`` ([q | k | v]) or
  ``grouped`` (per kv group ``[q_0 .. q_{G-1}, k, v]``, GPT-NeoX/BLOOM/Falcon).

A family is one entry of ``MLP_LAYOUTS`` or ``ATTENTION_LAYOUTS``: child names, which part of a
fused weight is which, and the packing. ``describe`` matches them against every module. Pure torch
(no Lightning); the sparse execution lives in ``lightning_sft.sparsity``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_sft.anatomy.linear import conv1d_type, linear_features, weight_is_transposed
from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.adapters.quantization import dense_view, is_quantized

Packing = Literal["separate", "concatenated", "grouped"]

# nn.Linear subclasses whose forward is exactly ``x @ W.T + b`` (class names in transformers).
LINEAR_EQUIVALENTS: frozenset[str] = frozenset({"FalconLinear"})


def _is_exact_linear(module: nn.Module) -> bool:
    kind = type(module)
    if kind is nn.Linear or kind is conv1d_type():
        return True
    return kind.__name__ in LINEAR_EQUIVALENTS and kind.__module__.startswith("transformers.") and isinstance(
        module, nn.Linear
    )


def projection_base(layer: nn.Module, name: str, frozen: bool = True) -> nn.Module:
    """The base layer of a projection (inside ``LoRALinear`` if wrapped), checked for what the sliced
    products compute: a plain linear map (nn.Linear, transformers Conv1D, ``LINEAR_EQUIVALENTS``) or a
    4-bit bitsandbytes ``Linear4bit``; with ``frozen``, a weight that needs no gradient."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    if isinstance(layer, LoRALinear) and layer.merged:
        raise ValueError(
            f"{name} is a merged LoRA layer: its base weight holds the adapter, which would be sparsified."
            " Call unmerge_adapter(model) before using contextual sparsity."
        )
    if not _is_exact_linear(base) and not is_quantized(base):
        raise TypeError(
            f"{name} is a {type(base).__name__}; contextual sparsity supports nn.Linear, transformers Conv1D,"
            f" {', '.join(sorted(LINEAR_EQUIVALENTS))} or 4-bit bitsandbytes Linear4bit projections, optionally"
            " wrapped in LoRALinear."
        )
    if frozen and base.weight.requires_grad:
        raise ValueError(
            f"{name}.weight requires grad; sparse projections need a frozen base"
            " (inject LoRA or freeze the base model first)."
        )
    return base


def logical_weight(base: nn.Module) -> Tensor:
    """The frozen weight in nn.Linear layout (out, in): Conv1D's transposed view, a 4-bit weight's
    decode-on-use view; never a copy."""
    return base.weight.t() if weight_is_transposed(base) else dense_view(base)


# -- the description -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Slice:
    """Channels of one projection: ``index[c]`` are the physical output rows (producer) or input
    columns (consumer) of channel ``c``, shape ``(channels, fanout)``; fanout > 1 for GQA."""

    path: str
    index: Tensor

    def physical(self, channels: Tensor) -> Tensor:
        """The rows/columns of the selected ``channels`` (sorted channel order, then fanout)."""
        return self.index.to(channels.device).index_select(0, channels).reshape(-1)


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """One index set per step: ``producers`` compute the channels, ``consumers`` read them."""

    name: str  # "mlp", "qk" or "v"
    channels: int
    producers: tuple[Slice, ...]
    consumers: tuple[Slice, ...]


@dataclass(frozen=True, eq=False)
class BlockAnatomy:
    """One MLP or attention block of a model: its channel groups and what the estimators read.

    ``region`` is the module whose forward is the whole block and acts on each token separately
    (an MLP module): the sparse path may run it on the context tokens alone with compact
    intermediates. Without one (an MLP spread over a decoder or encoder layer, and attention), the
    projections are made sparse in place.
    """

    name: str
    kind: Literal["mlp", "attention"]
    layout: str
    groups: tuple[ChannelGroup, ...]
    region: str | None = None
    activation: str | None = None  # MLP: the activation module applied to the first producer
    heads: tuple[int, int, int] | None = None  # attention: (num_heads, num_kv_heads, head_dim)
    hidden: int = 0

    @property
    def gated(self) -> bool:
        return self.kind == "mlp" and len(self.groups[0].producers) == 2

    @property
    def projections(self) -> list[str]:
        """Every projection path of the block, producers first, in order, once each."""
        paths = [s.path for g in self.groups for s in (*g.producers, *g.consumers)]
        return list(dict.fromkeys(paths))

    @property
    def intermediate(self) -> int:
        return self.groups[0].channels

    def key(self, group: str) -> str:
        """The name a group reports under (metrics, estimator state, cache): an MLP's block name, an
        attention's ``<block>.qk`` / ``<block>.v``."""
        return self.name if self.kind == "mlp" else f"{self.name}.{group}"

    def estimator_blocks(self, model: nn.Module) -> dict[str, Any]:
        """The estimator ``Block`` of each group, from the frozen base weights (LoRA excluded)."""
        from lightning_sft.sparsity.blocks import GatedMLPBlock, MLPBlock, QKBlock, VBlock

        def rows(part: Slice) -> tuple[Tensor, Tensor | None]:
            base = projection_base(model.get_submodule(part.path), part.path, frozen=False)
            index = part.index[:, 0]  # one row per channel (q comes re-indexed by query channel)
            weight, bias = _gather_rows(logical_weight(base), index), base.bias
            return weight, (None if bias is None else _gather_rows(bias, index))

        if self.kind == "mlp":
            producers = self.groups[0].producers
            activation = model.get_submodule(self.activation)
            if self.gated:
                (gate, gate_bias), (up, up_bias) = rows(producers[0]), rows(producers[1])
                return {"mlp": GatedMLPBlock(gate, up, activation, gate_bias=gate_bias, up_bias=up_bias)}
            fc1, bias = rows(producers[0])
            return {"mlp": MLPBlock(fc1, activation, bias=bias)}
        num_heads, num_kv_heads, _ = self.heads
        qk, v = self.groups
        q, q_bias = rows(_query_rows(qk.producers[0], num_heads, num_kv_heads, self.heads[2]))
        k, k_bias = rows(qk.producers[1])
        v_weight, v_bias = rows(v.producers[0])
        return {
            "qk": QKBlock(q, k, num_heads, num_kv_heads, q_bias=q_bias, k_bias=k_bias, balanced=True, rotary_pairs=True),
            "v": VBlock(v_weight, num_kv_heads, v_bias=v_bias),
        }


def _query_rows(q: Slice, num_heads: int, num_kv_heads: int, head_dim: int) -> Slice:
    """The q slice re-indexed by query channel ``h * head_dim + d`` (the HF head layout)."""
    group = num_heads // num_kv_heads
    by_kv = q.index.reshape(num_kv_heads, head_dim, group)  # [g, d, j] -> row of head g * group + j
    return Slice(q.path, by_kv.permute(0, 2, 1).reshape(-1, 1))


def _gather_rows(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor[index]``: a view for a contiguous range (separate and concatenated layouts)."""
    start = int(index[0]) if index.numel() else 0
    if torch.equal(index, torch.arange(start, start + index.numel())):
        return tensor.narrow(0, start, index.numel())
    return tensor.index_select(0, index.to(tensor.device))


@dataclass(frozen=True)
class ModelAnatomy:
    """What ``describe`` found: MLP and attention blocks in module (depth) order, and the
    mixture-of-experts blocks, whose experts are not described."""

    mlps: list[BlockAnatomy]
    attentions: list[BlockAnatomy]
    moe: list[str] = field(default_factory=list)


# -- layouts: one entry per family layout ------------------------------------------------------------


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


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _features(model: nn.Module, path: str) -> tuple[int, int]:
    return linear_features(projection_base(model.get_submodule(path), path, frozen=False))


# -- building one block ------------------------------------------------------------------------------


def _check_config(layout: MLPLayout, name: str, config: Any) -> None:
    for attribute, required in layout.config:
        value = getattr(config, attribute, required)
        if value != required:
            raise ValueError(
                f"{name} ({layout.families}) has config.{attribute} = {value!r}; contextual sparsity needs"
                f" {required!r} (the forward then calls each projection once on the layer's tokens)."
            )


def _mlp_block(model: nn.Module, name: str, layout: MLPLayout, config: Any) -> BlockAnatomy:
    _check_config(layout, name, config)
    consumer = _join(name, layout.consumer)
    intermediate, hidden = _features(model, consumer)
    producers = []
    for part in layout.producers:
        path = _join(name, part.path)
        fan_in, out = _features(model, path)
        if (fan_in, out) != (hidden, part.chunks * intermediate):
            raise ValueError(
                f"{name}: {part.path} has (in, out) features {(fan_in, out)}, but {layout.consumer} reads"
                f" {intermediate} channels into {hidden}: expected ({hidden}, {part.chunks} x {intermediate})."
            )
        producers.append(Slice(path, (part.chunk * intermediate + torch.arange(intermediate))[:, None]))
    group = ChannelGroup("mlp", intermediate, tuple(producers), (Slice(consumer, torch.arange(intermediate)[:, None]),))
    return BlockAnatomy(
        name, "mlp", layout.name, (group,), region=name if layout.exact else None,
        activation=_join(name, layout.activation), hidden=hidden,
    )


def _heads(config: Any, name: str) -> tuple[int, int]:
    num_heads = getattr(config, "num_attention_heads", None)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise TypeError(
            f"{name} has no config.num_attention_heads; sparse attention reads the head layout from the"
            " model's HF config (num_attention_heads, num_key_value_heads, head_dim)."
        )
    if getattr(config, "new_decoder_architecture", False):
        num_kv_heads = config.num_kv_heads
    elif getattr(config, "multi_query", False):
        num_kv_heads = 1
    else:
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    if num_heads % num_kv_heads:
        raise ValueError(
            f"{name}: {num_heads} query heads cannot be paired with {num_kv_heads} kv heads under grouped-query"
            " attention (num_attention_heads must be a multiple of num_key_value_heads)."
        )
    return num_heads, num_kv_heads


def _role_rows(packing: Packing, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Physical rows of the q (query channel ``h * head_dim + d``), k and v channels
    (``g * head_dim + d``) in their projections' output."""
    group = num_heads // num_kv_heads
    q, kv = torch.arange(num_heads * head_dim), torch.arange(num_kv_heads * head_dim)
    if packing == "separate":
        return q, kv, kv.clone()
    if packing == "concatenated":
        return q, q.numel() + kv, q.numel() + kv.numel() + kv
    stride = (group + 2) * head_dim  # grouped: [q_0 .. q_{group-1}, k, v] per kv group
    head, dim = q // head_dim, q % head_dim
    q_rows = (head // group) * stride + (head % group) * head_dim + dim
    kv_head, kv_dim = kv // head_dim, kv % head_dim
    k_rows = kv_head * stride + group * head_dim + kv_dim
    return q_rows, k_rows, k_rows + head_dim


def _attention_block(model: nn.Module, name: str, layout: AttentionLayout, config: Any) -> BlockAnatomy:
    num_heads, num_kv_heads = _heads(config, name)
    paths = [_join(name, path) for path in layout.qkv]
    o_path = _join(name, layout.o)
    o_in, hidden = _features(model, o_path)
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    packing = layout.packing_for(config)
    q_rows, k_rows, v_rows = _role_rows(packing, num_heads, num_kv_heads, head_dim)
    widths = {"q": q_rows.numel(), "k": k_rows.numel(), "v": v_rows.numel()}
    expected = {path: 0 for path in paths}
    for path, rows in zip(paths, (q_rows, k_rows, v_rows)):
        expected[path] = max(expected[path], int(rows.max()) + 1)
    actual = {path: _features(model, path) for path in expected}
    wanted = {path: (hidden, out) for path, out in expected.items()}
    if actual != wanted or o_in != widths["q"]:
        raise ValueError(
            f"{name} ({layout.name}): projections with (in, out) features {actual} and {layout.o} {(o_in, hidden)}"
            f" do not split as the config says ({num_heads} heads, {num_kv_heads} kv heads of dim {head_dim},"
            f" {packing} packing: expected {wanted} and {layout.o} ({widths['q']}, {hidden}))."
        )
    group = num_heads // num_kv_heads
    channel = torch.arange(num_kv_heads * head_dim)
    g, d = channel // head_dim, channel % head_dim
    query = ((g[:, None] * group + torch.arange(group)[None, :]) * head_dim + d[:, None])  # (kv channels, group)
    qk = ChannelGroup(
        "qk", channel.numel(), (Slice(paths[0], q_rows[query]), Slice(paths[1], k_rows[:, None])), ()
    )
    v = ChannelGroup("v", channel.numel(), (Slice(paths[2], v_rows[:, None]),), (Slice(o_path, query),))
    return BlockAnatomy(name, "attention", layout.name, (qk, v), heads=(num_heads, num_kv_heads, head_dim),
                        hidden=hidden)


# -- the whole model ---------------------------------------------------------------------------------


def _config_near(module: nn.Module, fallback: Any) -> Any:
    """The HF config of ``module`` or of its first descendant that has one, else the model's."""
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            return config
    return fallback


def _is_moe(module: nn.Module) -> bool:
    """A mixture-of-experts block: one whose ``experts`` child holds the experts (transformers: 3-D
    batched weights applied inside a routing loop, no projection modules to slice)."""
    return isinstance(getattr(module, "experts", None), nn.Module)


def describe(model: nn.Module) -> ModelAnatomy:
    """The MLP and attention blocks of ``model``, matched against the layout tables in module order.

    Raises ``TypeError`` naming every layout it looked for when it finds neither, and ``ValueError``
    when a matched block's shapes disagree with its config (a fused width that does not split).
    """
    root_config = _config_near(model, None)
    mlps: list[BlockAnatomy] = []
    attentions: list[BlockAnatomy] = []
    moe: list[str] = []
    claimed: set[str] = set()
    skip: list[str] = []  # prefixes whose modules are already described (or are experts)
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in skip):
            continue
        if _is_moe(module):
            moe.append(name)
            skip.append(f"{name}.experts")
            continue
        config = None
        for kind, layouts, build, found in (
            ("mlp", MLP_LAYOUTS, _mlp_block, mlps),
            ("attention", ATTENTION_LAYOUTS, _attention_block, attentions),
        ):
            inside = any(name.startswith(prefix + ".") for prefix in moe) and kind == "mlp"
            layout = next((layout for layout in layouts if layout.matches(module)), None)
            if layout is None or inside:
                continue
            config = _config_near(module, root_config) if config is None else config
            block = build(model, name, layout, config)
            overlap = claimed & set(block.projections)
            if overlap:
                raise ValueError(f"{name}: projections {sorted(overlap)} already belong to another block.")
            claimed |= set(block.projections)
            found.append(block)
            if not isinstance(layout, MLPLayout) or layout.exact:  # a whole block: nothing inside is another
                skip.append(name)
    if not (mlps or attentions):
        mlp = "; ".join(f"{', '.join(l.paths())} ({l.families})" for l in MLP_LAYOUTS)
        attention = "; ".join(f"{', '.join(l.paths())} ({l.families})" for l in ATTENTION_LAYOUTS)
        raise TypeError(
            f"{type(model).__name__} has no recognisable MLP or attention block, so contextual sparsity has nothing"
            f" to apply to. Looked for MLPs with: {mlp}. Looked for attention with: {attention}."
            " Add an entry to lightning_sft.anatomy.MLP_LAYOUTS / ATTENTION_LAYOUTS for a new family."
        )
    return ModelAnatomy(mlps, attentions, moe)
