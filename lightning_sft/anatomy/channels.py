"""Finding the channel groups of a model's MLP and attention blocks by structure (``describe``).

A *channel group* is a set of intermediate channels chosen together: its *producers* are output
rows of projections that compute a channel, its *consumers* are input columns of projections
that read it. A fused projection is simply several producer slices of one weight:

* gated MLP: channel ``i`` is row ``i`` of gate and up (of ``gate_up_proj``: rows ``i`` and
  ``I + i``) and column ``i`` of down;
* plain MLP: row ``i`` of fc1, column ``i`` of fc2;
* attention, two groups over the kv channels ``(g, d)`` (kv head ``g``, dim ``d``): ``qk`` is row
  ``(g, d)`` of k and rows ``(h, d)`` of q for every query head ``h`` of group ``g`` (GQA);
  ``v`` is row ``(g, d)`` of v and columns ``(h, d)`` of o, at the rows the layout's packing puts
  them.

``describe`` matches the entries of ``layouts`` against every module, checks each match's shapes
against the model's config and returns the ``description`` dataclasses. Pure torch (no
Lightning); the sparse execution lives in ``lightning_sft.sparsity``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_sft.anatomy.description import BlockAnatomy, ChannelGroup, ModelAnatomy, Slice
from lightning_sft.anatomy.layouts import ATTENTION_LAYOUTS, MLP_LAYOUTS, AttentionLayout, MLPLayout, Packing
from lightning_sft.anatomy.linear import linear_features
from lightning_sft.anatomy.projections import projection_base


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
