"""Contextual-sparse attention projections (SparseLoRA) for HF LLaMA-family attention (q_proj,
k_proj, v_proj, o_proj; grouped-query attention included), without re-implementing attention.

The attention module's own forward still does RoPE, the GQA repeat, masks and SDPA. Hooks change
only what its four projections return for the context tokens:

* a forward pre-hook on the attention module chooses, once per layer per forward, the kv channels
  for Q/K (``QKBlock`` with ``balanced=True, rotary_pairs=True``) and for V from the attention
  input, and maps them to q/k/v/o indices with ``attention_indices`` (correct under GQA);
* q/k/v_proj compute the context tokens' kept output channels with ``rows_matmul`` (the LoRA
  branch dense, restricted to those channels) and return zeros in the others;
* o_proj reads only the kept input channels of the context tokens with ``cols_matmul``.

For context tokens the layer output therefore equals the dense attention whose q/k/v projection
outputs have the unselected channels zeroed before RoPE (with rotary pairs they stay zero after
it) and whose o_proj input keeps only the selected V-derived channels. Output tokens' projections
stay dense, but their attention still reads the context tokens' sparse keys and values: that is
the method. The attention matmuls themselves stay dense (no FLOPs are skipped there).

Hooks rather than wrapper modules: replacing a ``LoRALinear`` projection by a wrapper would hide it
from ``lora_layers`` (adapter saving, merging, checkpoints). Nothing in the module tree changes, so
parameter names, state-dict keys and ``lora_layers`` are untouched; ``unwrap_attention`` removes
the hooks. A projection replaced after wrapping (LoRA injected later) is re-hooked on the next
forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_sft.adapters.linear_layers import linear_features, weight_is_transposed
from lightning_sft.adapters.quantization import dense_view
from lightning_sft.kernels.token_rows import TokenRows
from lightning_sft.sparsity.blocks import AttentionIndices, QKBlock, VBlock, attention_indices
from lightning_sft.sparsity.estimators import ChannelEstimator, build_estimator
from lightning_sft.sparsity.schedule import kept_channels
from lightning_sft.sparsity.sparse_flops import attention_projection_flops
from lightning_sft.sparsity.sparse_mlp import SparsityState, _check_projection, _cols, _rows

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class AttentionGeometry:
    """Head layout of one attention module (from its config, checked against its projections)."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_channels(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class _Plan:
    """One forward's selection, shared by the layer's four projection hooks."""

    indices: AttentionIndices
    sparse_pos: Tensor  # flat (batch * seq) positions run sparse
    dense_pos: Tensor
    # per projection, pre-hook -> hook: the input's leading shape and its context rows
    inputs: dict[str, tuple[torch.Size, Tensor]] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    rows: TokenRows = field(init=False)
    _shared: tuple[Tensor, Tensor, Tensor] | None = field(default=None, init=False)  # q/k/v input, its split

    def __post_init__(self) -> None:
        rows = self.sparse_pos.numel() + self.dense_pos.numel()
        mask = torch.zeros(rows, dtype=torch.bool, device=self.sparse_pos.device)
        self.rows = TokenRows(mask.index_fill_(0, self.sparse_pos, True))

    def split(self, role: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """(context rows, dense rows) of a projection input. o_proj's context rows keep only the
        V-derived channels it reads; q/k/v share one input, split once (one merge in backward)."""
        flat = x.reshape(-1, x.shape[-1])
        if role == "o_proj":
            return self.rows.split(flat, self.indices.o)
        if self._shared is None or self._shared[0] is not x:
            self._shared = (x, *self.rows.split(flat))
        return self._shared[1], self._shared[2]


def _bases(attention: nn.Module, name: str) -> dict[str, nn.Module]:
    """The frozen base layers of the four projections, checked as the sparse MLPs check theirs."""
    missing = [role for role in PROJECTIONS if not isinstance(getattr(attention, role, None), nn.Module)]
    if missing:
        raise TypeError(
            f"{name} ({type(attention).__name__}) is not a LLaMA-style attention module: it lacks"
            f" {', '.join(missing)} (expected {', '.join(PROJECTIONS)})."
        )
    bases = {role: _check_projection(f"{name}.{role}", getattr(attention, role)) for role in PROJECTIONS}
    transposed = [role for role, base in bases.items() if weight_is_transposed(base)]
    if transposed:
        raise TypeError(f"{name}: {', '.join(transposed)} store (in x out) weights; sparse attention needs nn.Linear.")
    return bases


def _geometry(attention: nn.Module, name: str, bases: dict[str, nn.Module]) -> AttentionGeometry:
    """Heads from ``attention.config``; a config that disagrees with the weights is refused, since
    a wrong head layout would silently pair the wrong q and k channels."""
    config = getattr(attention, "config", None)
    num_heads = getattr(config, "num_attention_heads", None)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise TypeError(
            f"{name} ({type(attention).__name__}) has no config.num_attention_heads; sparse attention reads"
            " num_attention_heads, num_key_value_heads and head_dim from the module's HF config."
        )
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    hidden = linear_features(bases["q_proj"])[0]
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    geometry = AttentionGeometry(hidden, num_heads, num_kv_heads, head_dim)
    expected = {
        "q_proj": (hidden, num_heads * head_dim),
        "k_proj": (hidden, geometry.kv_channels),
        "v_proj": (hidden, geometry.kv_channels),
        "o_proj": (num_heads * head_dim, hidden),
    }
    actual = {role: linear_features(base) for role, base in bases.items()}
    if num_heads % num_kv_heads or actual != expected:
        raise ValueError(
            f"{name}: projections with (in, out) features {actual} do not match the config's {num_heads} heads,"
            f" {num_kv_heads} kv heads of dim {head_dim} (expected {expected})."
        )
    return geometry


class SparseAttentionHooks:
    """The hooks that make one attention module's context tokens sparse (see the module docstring).

    Dense (no change at all) while ``state.active`` is False, no mask is set, or the mask has no
    True. Gradients reach the input and the LoRA parameters exactly as in the dense computation
    described above. Skipped FLOPs (projections only) count the input-gradient backward only when
    the output needs a gradient; recomputation under activation checkpointing is counted again.
    """

    def __init__(
        self,
        attention: nn.Module,
        state: SparsityState,
        qk_estimator: ChannelEstimator,
        v_estimator: ChannelEstimator,
        keep_qk: int,
        keep_v: int,
        name: str,
        geometry: AttentionGeometry,
    ) -> None:
        self.attention = attention
        self.state = state
        self.qk_estimator = qk_estimator
        self.v_estimator = v_estimator
        self.keep_qk = keep_qk
        self.keep_v = keep_v
        self.name = name
        self.geometry = geometry
        self._plan: _Plan | None = None
        self._projections: dict[str, nn.Module] = {}
        self._projection_handles: dict[str, list[RemovableHandle]] = {}
        self._handles = [
            attention.register_forward_pre_hook(self._before_attention, with_kwargs=True),
            attention.register_forward_hook(self._after_attention),
        ]
        for role in PROJECTIONS:
            self._hook_projection(role)

    def _hook_projection(self, role: str) -> None:
        for handle in self._projection_handles.pop(role, []):
            handle.remove()
        module = getattr(self.attention, role)
        self._projections[role] = module
        self._projection_handles[role] = [
            module.register_forward_pre_hook(partial(self._before_projection, role)),
            module.register_forward_hook(partial(self._after_projection, role)),
        ]

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for handle in [*self._handles, *(h for handles in self._projection_handles.values() for h in handles)]:
            handle.remove()
        self._handles, self._projection_handles, self._projections, self._plan = [], {}, {}, None

    def _before_attention(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._plan = None
        for role in PROJECTIONS:
            if getattr(module, role) is not self._projections[role]:
                self._hook_projection(role)
        state = self.state
        if state.context_mask is None or not (state.active or state.observing):
            return
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0] if args else None
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: the attention module was called without hidden_states.")
        state.observe(self.name, x)
        if not state.active:
            return
        mask = state.checked_mask(x, self.name)
        flat = mask.reshape(-1)
        if not bool(flat.any()):
            return
        for role, projection in self._projections.items():
            _check_projection(f"{self.name}.{role}", projection)
        g = self.geometry
        qk_idx = state.select(self.qk_estimator, x, self.keep_qk, mask)
        v_idx = state.select(self.v_estimator, x, self.keep_v, mask)
        indices = attention_indices(qk_idx, v_idx, g.num_heads, g.num_kv_heads, g.head_dim)
        if state.sparse_output_tokens:
            flat = flat.new_ones(flat.shape)
        self._plan = _Plan(indices, flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1))

    def _before_projection(self, role: str, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Hand the projection's own forward only the dense tokens; the hook below adds the rest."""
        plan = self._plan
        if plan is None:
            return None
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"{self.name}.{role} must be called with its input as the first positional argument.")
        x = args[0]
        context, dense = plan.split(role, x)
        plan.inputs[role] = (x.shape[:-1], context)
        return (dense, *args[1:])

    def _after_projection(self, role: str, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        plan = self._plan
        if plan is None or role not in plan.inputs:
            return None
        lead, context = plan.inputs.pop(role)
        if role == "o_proj":
            out = plan.rows.merge(_cols(module, context, plan.indices.o), output)
        else:  # the dropped q/k/v channels of the context rows are zero
            idx = getattr(plan.indices, role[0])
            out = plan.rows.merge(_rows(module, context, idx), output, idx, output.shape[-1])
        plan.ran.append(role)
        return out.view(*lead, out.shape[-1])

    def _after_attention(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        plan, self._plan = self._plan, None
        if plan is None:
            return
        if sorted(plan.ran) != sorted(PROJECTIONS):
            raise RuntimeError(
                f"{self.name} ({type(module).__name__}) ran {plan.ran} sparse; sparse attention needs a forward"
                f" that calls each of {', '.join(PROJECTIONS)} once on the layer's tokens."
            )
        out = output[0] if isinstance(output, tuple) else output
        g = self.geometry
        kept_qk, kept_v = plan.indices.k.numel(), plan.indices.v.numel()
        flops = attention_projection_flops(
            g.hidden, g.num_heads, g.num_kv_heads, g.head_dim, context_tokens=plan.sparse_pos.numel(),
            output_tokens=plan.dense_pos.numel(), kept_qk=kept_qk, kept_v=kept_v,
        )
        skipped = flops.dense_forward - flops.sparse_forward
        if out.requires_grad:
            skipped += flops.dense_backward - flops.sparse_backward
        self.state.skipped_flops += skipped
        self.state.layer_sparsity[f"{self.name}.qk"] = 1.0 - kept_qk / g.kv_channels
        self.state.layer_sparsity[f"{self.name}.v"] = 1.0 - kept_v / g.kv_channels

    def __repr__(self) -> str:
        return (
            f"SparseAttentionHooks(name={self.name!r}, keep_qk={self.keep_qk}/{self.geometry.kv_channels},"
            f" keep_v={self.keep_v}/{self.geometry.kv_channels}, estimator={type(self.qk_estimator).__name__})"
        )


def attention_hooks(module: nn.Module) -> SparseAttentionHooks | None:
    """The ``SparseAttentionHooks`` attached to ``module``, if any (found through its own hooks, so
    no global registry keeps modules alive)."""
    for hook in module._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, SparseAttentionHooks):
            return owner
    return None


def wrap_attention(
    model: nn.Module,
    state: SparsityState,
    strategy: str,
    sparsity_per_layer: Sequence[float],
    layer_attentions: Sequence[tuple[str, nn.Module]],
    **estimator_options: object,
) -> list[str]:
    """Make each named attention module of ``model`` sparse at its sparsity (hooks, see above).

    ``layer_attentions`` are ``(name in model, module)`` pairs, one per entry of
    ``sparsity_per_layer``; sparsity 0 leaves a layer dense and unhooked. Q/K keep
    ``kept_channels(kv, s, multiple_of=2 * num_kv_heads)`` kv channels (balanced over kv heads,
    RoPE pairs together), V keeps ``kept_channels(kv, s)``. Every check and every estimator comes
    before the first hook, so bad input leaves ``model`` unchanged. Returns the hooked names.
    """
    if len(sparsity_per_layer) != len(layer_attentions):
        raise ValueError(
            f"{len(sparsity_per_layer)} sparsities for {len(layer_attentions)} attention modules; pass one per module."
        )
    planned: list[dict[str, Any]] = []
    seen_names: set[str] = set()
    seen_modules: set[int] = set()
    for (name, attention), sparsity in zip(layer_attentions, sparsity_per_layer):
        if not name or name in seen_names or id(attention) in seen_modules:
            raise ValueError(f"Attention names and modules must be unique and names non-empty, got {name!r}.")
        seen_names.add(name)
        seen_modules.add(id(attention))
        try:
            found = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"{name!r} is not a submodule of {type(model).__name__}.") from error
        if found is not attention:
            raise ValueError(f"{name!r} in {type(model).__name__} is not the module passed with it.")
        if attention_hooks(attention) is not None:
            raise ValueError(f"{name} already has sparse attention hooks; unwrap_attention(model) first.")
        bases = _bases(attention, name)
        geometry = _geometry(attention, name, bases)
        q, k, v = bases["q_proj"], bases["k_proj"], bases["v_proj"]
        qk_block = QKBlock(
            dense_view(q), dense_view(k), geometry.num_heads, geometry.num_kv_heads, q_bias=q.bias, k_bias=k.bias,
            balanced=True, rotary_pairs=True,
        )
        v_block = VBlock(dense_view(v), geometry.num_kv_heads, v_bias=v.bias)
        keep_qk = kept_channels(geometry.kv_channels, sparsity, multiple_of=2 * geometry.num_kv_heads)
        keep_v = kept_channels(geometry.kv_channels, sparsity)
        if sparsity == 0:
            continue
        planned.append(
            dict(
                attention=attention, state=state, keep_qk=keep_qk, keep_v=keep_v, name=name, geometry=geometry,
                qk_estimator=build_estimator(strategy, qk_block, f"{name}.qk", **estimator_options),
                v_estimator=build_estimator(strategy, v_block, f"{name}.v", **estimator_options),
            )
        )
    for arguments in planned:
        SparseAttentionHooks(**arguments)
    return [arguments["name"] for arguments in planned]


def unwrap_attention(model: nn.Module) -> list[str]:
    """Remove every sparse-attention hook under ``model``; returns the names of the modules."""
    names = []
    for name, module in model.named_modules():
        hooks = attention_hooks(module)
        if hooks is not None:
            hooks.remove()
            names.append(name)
    return names
