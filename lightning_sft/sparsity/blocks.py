"""The frozen weights one channel index set applies to (SparseLoRA blocks), their structured,
deterministic top-k, and the grouped-query index maps of a sparse attention block.

Pure torch (no Lightning). Index maps are described in ``docs/sparsity_estimators.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

Activation = str | Callable[[Tensor], Tensor]


def _resolve_activation(activation: Activation) -> Callable[[Tensor], Tensor]:
    """A callable, or a ``transformers`` activation name (``hidden_act`` of an HF config)."""
    if callable(activation):
        return activation
    from transformers.activations import ACT2FN

    if activation not in ACT2FN:
        raise ValueError(f"Unknown activation {activation!r}; expected a callable or one of {sorted(ACT2FN)}.")
    return ACT2FN[activation]


def _check_linear(name: str, weight: Tensor, bias: Tensor | None) -> None:
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError(f"{name} must be a 2-D weight in nn.Linear layout (out_features, in_features).")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name} bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},).")


def _stable_top_k(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores along the last dim; ties go to the lower index.

    ``torch.topk`` does not specify the order of ties; a stable descending sort does, which makes
    every rank of a data-parallel job pick the same channels from the same scores.
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def _check_k(k: int, num_channels: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_channels:
        raise ValueError(f"k must be an integer in [1, {num_channels}], got {k!r}.")


def _flat_top_k(scores: Tensor, k: int) -> Tensor:
    _check_k(k, scores.numel())
    return _stable_top_k(scores, k).sort().values


def _kv_top_k(scores: Tensor, k: int, num_kv_heads: int, head_dim: int, balanced: bool, rotary_pairs: bool) -> Tensor:
    """Top-k over kv channels ``g * head_dim + d`` with the optional structural constraints.

    ``balanced``: the same number of channels in every kv head (compact attention can then reshape
    to heads). ``rotary_pairs``: select the RoPE pairs ``(d, d + head_dim/2)`` (HF ``rotate_half``
    layout) together, so the kept dims are closed under the rotation and sliced q/k can be rotated
    with sliced cos/sin.
    """
    _check_k(k, num_kv_heads * head_dim)
    unit = (2 if rotary_pairs else 1) * (num_kv_heads if balanced else 1)
    if k % unit:
        raise ValueError(
            f"k={k} must be a multiple of {unit} (balanced={balanced}, rotary_pairs={rotary_pairs}); "
            f"use kept_channels(..., multiple_of={unit})."
        )
    grid = scores.reshape(num_kv_heads, head_dim)
    if rotary_pairs:
        grid = grid.reshape(num_kv_heads, 2, head_dim // 2).norm(dim=1)
    width = grid.shape[1]
    units_k = k // 2 if rotary_pairs else k
    if balanced:
        local = _stable_top_k(grid, units_k // num_kv_heads)
        units = (local + torch.arange(num_kv_heads, device=grid.device)[:, None] * width).reshape(-1)
    else:
        units = _stable_top_k(grid.reshape(-1), units_k)
    channels = units // width * head_dim + units % width
    if rotary_pairs:
        channels = torch.cat([channels, channels + head_dim // 2])
    return channels.sort().values


# -- blocks: the frozen weights one index set applies to -------------------------------------------


@dataclass(frozen=True, eq=False)
class GatedMLPBlock:
    """A gated MLP (LLaMA, Mistral, Qwen): channel ``i`` is row ``i`` of gate_proj and up_proj and
    column ``i`` of down_proj. Weights in nn.Linear layout (out x in), dequantized if quantized."""

    gate: Tensor
    up: Tensor
    activation: Activation = "silu"
    gate_bias: Tensor | None = None
    up_bias: Tensor | None = None
    act: Callable[[Tensor], Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_linear("gate", self.gate, self.gate_bias)
        _check_linear("up", self.up, self.up_bias)
        if self.gate.shape != self.up.shape:
            raise ValueError(f"gate {tuple(self.gate.shape)} and up {tuple(self.up.shape)} must have one shape.")
        object.__setattr__(self, "act", _resolve_activation(self.activation))

    @property
    def num_channels(self) -> int:
        return self.gate.shape[0]

    def weights(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        return {"gate": (self.gate, self.gate_bias), "up": (self.up, self.up_bias)}

    def top_k(self, scores: Tensor, k: int) -> Tensor:
        return _flat_top_k(scores, k)


@dataclass(frozen=True, eq=False)
class MLPBlock:
    """A plain MLP (GPT-2, BERT, GPT-NeoX): channel ``i`` is row ``i`` of fc1 and column ``i`` of
    fc2. GPT-2's Conv1D stores (in x out): pass its weight transposed."""

    fc1: Tensor
    activation: Activation = "gelu"
    bias: Tensor | None = None
    act: Callable[[Tensor], Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_linear("fc1", self.fc1, self.bias)
        object.__setattr__(self, "act", _resolve_activation(self.activation))

    @property
    def num_channels(self) -> int:
        return self.fc1.shape[0]

    def weights(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        return {"fc1": (self.fc1, self.bias)}

    def top_k(self, scores: Tensor, k: int) -> Tensor:
        return _flat_top_k(scores, k)


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
    for label, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}.")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}.")


@dataclass(frozen=True, eq=False)
class QKBlock:
    """q_proj and k_proj under the HF head layout: q row ``h * head_dim + d``, k row
    ``g * head_dim + d``; query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``.

    Channels are kv positions ``(g, d)``; a selected one keeps dim ``d`` of kv head ``g`` and of
    every query head of group ``g`` (see ``attention_indices``).
    """

    q: Tensor
    k: Tensor
    num_heads: int
    num_kv_heads: int
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    balanced: bool = False
    rotary_pairs: bool = False

    def __post_init__(self) -> None:
        _check_linear("q", self.q, self.q_bias)
        _check_linear("k", self.k, self.k_bias)
        _check_heads(self.num_heads, self.num_kv_heads)
        if self.q.shape[0] % self.num_heads:
            raise ValueError(f"q has {self.q.shape[0]} rows, not a multiple of num_heads={self.num_heads}.")
        if self.k.shape != (self.num_kv_heads * self.head_dim, self.q.shape[1]):
            raise ValueError(
                f"k has shape {tuple(self.k.shape)}, expected ({self.num_kv_heads * self.head_dim}, "
                f"{self.q.shape[1]}) for {self.num_kv_heads} kv heads of dim {self.head_dim}."
            )
        if self.rotary_pairs and self.head_dim % 2:
            raise ValueError(f"rotary_pairs needs an even head_dim, got {self.head_dim}.")

    @property
    def head_dim(self) -> int:
        return self.q.shape[0] // self.num_heads

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_channels(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weights(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        return {"q": (self.q, self.q_bias), "k": (self.k, self.k_bias)}

    def top_k(self, scores: Tensor, k: int) -> Tensor:
        return _kv_top_k(scores, k, self.num_kv_heads, self.head_dim, self.balanced, self.rotary_pairs)


@dataclass(frozen=True, eq=False)
class VBlock:
    """v_proj: channel ``g * head_dim + d`` is a row of v_proj; o_proj's input columns follow it
    for every query head of group ``g`` (see ``attention_indices``)."""

    v: Tensor
    num_kv_heads: int
    v_bias: Tensor | None = None
    balanced: bool = False

    def __post_init__(self) -> None:
        _check_linear("v", self.v, self.v_bias)
        if isinstance(self.num_kv_heads, bool) or not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be an integer >= 1, got {self.num_kv_heads!r}.")
        if self.v.shape[0] % self.num_kv_heads:
            raise ValueError(f"v has {self.v.shape[0]} rows, not a multiple of num_kv_heads={self.num_kv_heads}.")

    @property
    def num_channels(self) -> int:
        return self.v.shape[0]

    def weights(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        return {"v": (self.v, self.v_bias)}

    def top_k(self, scores: Tensor, k: int) -> Tensor:
        head_dim = self.v.shape[0] // self.num_kv_heads
        return _kv_top_k(scores, k, self.num_kv_heads, head_dim, self.balanced, False)


Block = GatedMLPBlock | MLPBlock | QKBlock | VBlock


# -- grouped-query index maps ------------------------------------------------------------------------


class AttentionIndices(NamedTuple):
    """Rows of q_proj, k_proj, v_proj and input columns of o_proj to keep (sorted, unique)."""

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor


def expand_kv_channels(kv_idx: Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> Tensor:
    """Map kv channels ``g * head_dim + d`` to the query-side channels ``h * head_dim + d`` of every
    query head ``h`` in group ``g`` (``h // (num_heads // num_kv_heads) == g``), sorted."""
    _check_heads(num_heads, num_kv_heads)
    total = num_kv_heads * head_dim
    if kv_idx.ndim != 1 or kv_idx.dtype != torch.long:
        raise ValueError("kv_idx must be a 1-D LongTensor of kv channel indices.")
    if kv_idx.numel() and (int(kv_idx.min()) < 0 or int(kv_idx.max()) >= total):
        raise ValueError(f"kv_idx holds indices outside [0, {total}) for {num_kv_heads} kv heads of dim {head_dim}.")
    mask = torch.zeros(total, dtype=torch.bool, device=kv_idx.device)
    mask[kv_idx] = True
    group = num_heads // num_kv_heads
    expanded = mask.reshape(num_kv_heads, 1, head_dim).expand(num_kv_heads, group, head_dim)
    return expanded.reshape(-1).nonzero().squeeze(1)


def attention_indices(
    qk_idx: Tensor, v_idx: Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> AttentionIndices:
    """The four index tensors of a sparse attention block from its kv-channel selections.

    ``q = expand(qk_idx)``, ``k = qk_idx``, ``v = v_idx``, ``o = expand(v_idx)`` with
    ``expand_kv_channels``: every query head sees exactly the dims its kv head kept, so q.k uses
    matched dims only, and o_proj reads exactly the attention-output dims the kept V produced.
    """
    return AttentionIndices(
        q=expand_kv_channels(qk_idx, num_heads, num_kv_heads, head_dim),
        k=qk_idx,
        v=v_idx,
        o=expand_kv_channels(v_idx, num_heads, num_kv_heads, head_dim),
    )
