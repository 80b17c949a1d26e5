"""The description of a model's channel groups: what ``describe`` returns and the sparse blocks read.

A *channel group* is a set of intermediate channels chosen together: its *producers* are output
rows of projections that compute a channel (``Slice``), its *consumers* are input columns of
projections that read it. A ``BlockAnatomy`` is one MLP or attention block's groups, a
``ModelAnatomy`` every block of a model; a block also hands the estimators their rows of its
frozen weights. Finding the blocks is ``channels``; the family layouts they are matched from are
``layouts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_sft.anatomy.projections import logical_weight, projection_base


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
