"""Contextual-sparse MLPs (SparseLoRA): the frozen projections of the context tokens run on the
intermediate channels an estimator keeps, everything else (and every LoRA branch) stays dense.

Pure torch (no Lightning): a callback owns one ``SparsityState``, wraps the MLPs with
``wrap_gated_mlps`` / ``wrap_plain_mlps`` and sets the state before each forward. See
``docs/sparsity_estimators.md``.

The wrapper registers the original module's children under their own names, so parameter and
state-dict keys do not change; the original module is kept outside the module tree and
``unwrap_all`` puts it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sft.adapters.injection import replace_submodule
from lightning_sft.adapters.linear_layers import _conv1d_type, linear_features, weight_is_transposed
from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.kernels import cols_matmul, rows_matmul
from lightning_sft.sparsity.blocks import Block, GatedMLPBlock, MLPBlock
from lightning_sft.sparsity.estimators import ChannelEstimator, build_estimator
from lightning_sft.sparsity.schedule import kept_channels
from lightning_sft.sparsity.sparse_flops import mlp_flops


@dataclass
class SparsityState:
    """What every wrapped layer of one model reads each forward, and what it reports back.

    A callback sets ``active`` and ``context_mask`` (bool ``(B, S)``; True = context token to run
    sparse, False = output token or padding, kept dense) before each forward, and reads then
    ``reset``s the accumulators after each step. ``sparse_output_tokens`` runs every token sparse
    (the channels are still chosen from the context tokens only).
    """

    active: bool = False
    context_mask: Tensor | None = None
    sparse_output_tokens: bool = False
    skipped_flops: float = 0.0
    layer_sparsity: dict[str, float] = field(default_factory=dict)

    def reset(self) -> None:
        """Clear the per-step accumulators (not the switches)."""
        self.skipped_flops = 0.0
        self.layer_sparsity = {}


def _check_projection(name: str, layer: nn.Module) -> nn.Module:
    """The base layer of a projection; a clear error for what the kernels cannot run."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    if isinstance(layer, LoRALinear) and layer.merged:
        raise ValueError(
            f"{name} is a merged LoRA layer: its base weight holds the adapter, which would be sparsified."
            " Call unmerge_adapter(model) before using contextual sparsity."
        )
    if type(base) not in (nn.Linear, _conv1d_type()):
        raise TypeError(
            f"{name} is a {type(base).__name__}; contextual sparsity supports plain nn.Linear or transformers Conv1D"
            " projections (optionally wrapped in LoRALinear), not quantized or custom layers."
        )
    if base.weight.requires_grad:
        raise ValueError(
            f"{name}.weight requires grad; sparse projections need a frozen base"
            " (inject LoRA or freeze the base model first)."
        )
    return base


def _check_mlp(mlp: nn.Module, name: str, kind: type[_SparseMLP]) -> list[nn.Module]:
    """The base layers of ``kind``'s projections (input side first), checked for a shape the sparse
    path can compute: hidden -> intermediate (all but the last) -> hidden (the last)."""
    projections = kind.projections
    missing = [child for child in (*projections, kind.activation) if not hasattr(mlp, child)]
    if missing:
        raise TypeError(
            f"{name} ({type(mlp).__name__}) is not a {kind.family} MLP: it lacks {', '.join(missing)}"
            f" (expected {', '.join(projections)} and {kind.activation})."
        )
    if isinstance(mlp, _SparseMLP):
        raise ValueError(f"{name} is already a {type(mlp).__name__}; unwrap_all(model) first.")
    if next(mlp.parameters(recurse=False), None) is not None or next(mlp.buffers(recurse=False), None) is not None:
        raise TypeError(f"{name} ({type(mlp).__name__}) has parameters of its own; only its projections are supported.")
    bases = [_check_projection(f"{name}.{child}", getattr(mlp, child)) for child in projections]
    hidden, intermediate = linear_features(bases[0])
    shapes = [linear_features(base) for base in bases]
    if any(shape != (hidden, intermediate) for shape in shapes[:-1]) or shapes[-1] != (intermediate, hidden):
        raise ValueError(
            f"{name}: {', '.join(projections)} with (in, out) features {shapes} do not form a"
            " hidden -> intermediate -> hidden MLP."
        )
    return bases


def _rows(layer: nn.Module, x: Tensor, idx: Tensor) -> Tensor:
    """Output channels ``idx`` of a projection; a LoRA branch stays dense: ``(x A^T s) B[idx]^T``."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    out = rows_matmul(x, base.weight, idx, base.bias, transposed=weight_is_transposed(base), check_idx=False)
    if not isinstance(layer, LoRALinear):
        return out
    h = F.linear(layer.dropout(x).to(layer.lora_A.dtype), layer.lora_A) * layer.scaling
    return out + F.linear(h, layer.lora_B.index_select(0, idx)).to(out.dtype)


def _cols(layer: nn.Module, h: Tensor, idx: Tensor) -> Tensor:
    """A projection of ``h`` that holds only input channels ``idx`` (the others are zero):
    the LoRA branch is ``(h A[:, idx]^T s) B^T``, its dense value on the zero-filled input."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    out = cols_matmul(h, base.weight, idx, base.bias, transposed=weight_is_transposed(base), check_idx=False)
    if not isinstance(layer, LoRALinear):
        return out
    a = F.linear(layer.dropout(h).to(layer.lora_A.dtype), layer.lora_A.index_select(1, idx)) * layer.scaling
    return out + F.linear(a, layer.lora_B).to(out.dtype)


class _SparseMLP(nn.Module):
    """An HF MLP with its context tokens run on ``keep`` intermediate channels chosen by
    ``estimator`` once per forward (one set for the whole batch); subclasses name the children.

    Dense (the original module's own forward) while ``state.active`` is False or no mask is set.
    Gradients reach the input and the LoRA parameters exactly as in the dense MLP with the dropped
    channels zeroed. Skipped FLOPs count the input-gradient backward only when the output needs a
    gradient; recomputation under activation checkpointing is counted again.
    """

    projections: tuple[str, ...]
    activation: str
    gated: bool
    family: str

    def __init__(self, mlp: nn.Module, state: SparsityState, estimator: ChannelEstimator, keep: int, name: str) -> None:
        super().__init__()
        hidden, intermediate = linear_features(_check_mlp(mlp, name, type(self))[0])
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= intermediate:
            raise ValueError(f"{name}: keep must be an integer in [1, {intermediate}] channels, got {keep!r}.")
        # Outside the module tree: the children below carry the parameters under their original names.
        self.__dict__["_original"] = mlp
        for child_name, child in mlp.named_children():
            self.add_module(child_name, child)
        self.state = state
        self.estimator = estimator
        self.keep = keep
        self.name = name
        self.hidden = hidden
        self.intermediate = intermediate

    @classmethod
    def block(cls, mlp: nn.Module, name: str = "mlp") -> Block:
        """The estimator block of ``mlp`` from its frozen base weights (the LoRA update excluded)."""
        raise NotImplementedError

    @property
    def original(self) -> nn.Module:
        """The wrapped module, with any child replaced since wrapping (e.g. by LoRA injection) synced."""
        original = self.__dict__["_original"]
        for child_name, child in self.named_children():
            if getattr(original, child_name) is not child:
                setattr(original, child_name, child)
        return original

    def forward(self, x: Tensor) -> Tensor:
        state = self.state
        if not state.active or state.context_mask is None:
            return self.original(x)
        mask = state.context_mask.to(x.device)
        if x.ndim != 3 or mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"{self.name}: state.context_mask must be a bool (batch, seq) tensor matching the MLP input"
                f" {tuple(x.shape)}, got {mask.dtype} {tuple(mask.shape)}."
            )
        context = int(mask.sum())
        if context == 0:
            return self.original(x)
        for child_name in self.projections:
            _check_projection(f"{self.name}.{child_name}", getattr(self, child_name))
        idx = self.estimator.select(x, self.keep, context_mask=mask)
        if state.sparse_output_tokens:
            out = self._sparse(x, idx)
            context, dense = mask.numel(), 0
        else:
            out, dense = self._split(x, mask, idx), mask.numel() - context
        self._account(context, dense, idx.numel(), out.requires_grad)
        return out

    def _sparse(self, x: Tensor, idx: Tensor) -> Tensor:
        raise NotImplementedError

    def _split(self, x: Tensor, mask: Tensor, idx: Tensor) -> Tensor:
        """Context tokens sparse, the rest through the original module, scattered back in place."""
        flat_x = x.reshape(-1, x.shape[-1])
        flat_mask = mask.reshape(-1)
        sparse_pos = flat_mask.nonzero().squeeze(1)
        dense_pos = (~flat_mask).nonzero().squeeze(1)
        sparse_out = self._sparse(flat_x.index_select(0, sparse_pos), idx)
        out = sparse_out.new_zeros(flat_x.shape[0], sparse_out.shape[-1]).index_copy(0, sparse_pos, sparse_out)
        if dense_pos.numel():
            dense_out = self.original(flat_x.index_select(0, dense_pos))
            out = out.index_copy(0, dense_pos, dense_out.to(out.dtype))
        return out.view(*x.shape[:-1], out.shape[-1])

    def _account(self, context: int, dense: int, kept: int, backward: bool) -> None:
        flops = mlp_flops(
            self.hidden, self.intermediate, context_tokens=context, output_tokens=dense, kept=kept, gated=self.gated
        )
        skipped = flops.dense_forward - flops.sparse_forward
        if backward:
            skipped += flops.dense_backward - flops.sparse_backward
        self.state.skipped_flops += skipped
        self.state.layer_sparsity[self.name] = 1.0 - kept / self.intermediate

    def extra_repr(self) -> str:
        return f"name={self.name!r}, keep={self.keep}/{self.intermediate}, estimator={type(self.estimator).__name__}"


class SparseGatedMLP(_SparseMLP):
    """LLaMA/Qwen2/Mistral/Gemma MLP, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: kept
    channels are rows of gate/up and columns of down."""

    projections = ("gate_proj", "up_proj", "down_proj")
    activation = "act_fn"
    gated = True
    family = "gated (LLaMA-style)"

    @classmethod
    def block(cls, mlp: nn.Module, name: str = "mlp") -> GatedMLPBlock:
        gate, up, _ = _check_mlp(mlp, name, cls)
        return GatedMLPBlock(gate.weight, up.weight, mlp.act_fn, gate_bias=gate.bias, up_bias=up.bias)

    def _sparse(self, x: Tensor, idx: Tensor) -> Tensor:
        h = self.act_fn(_rows(self.gate_proj, x, idx)) * _rows(self.up_proj, x, idx)
        return _cols(self.down_proj, h, idx)


class SparsePlainMLP(_SparseMLP):
    """GPT-2 MLP, ``dropout(c_proj(act(c_fc(x))))`` with Conv1D (in x out) weights: kept channels
    are output columns of c_fc and input rows of c_proj. c_proj's bias is added in full."""

    projections = ("c_fc", "c_proj")
    activation = "act"
    gated = False
    family = "plain (GPT-2-style)"

    @classmethod
    def block(cls, mlp: nn.Module, name: str = "mlp") -> MLPBlock:
        fc, _ = _check_mlp(mlp, name, cls)
        weight = fc.weight.t() if weight_is_transposed(fc) else fc.weight
        return MLPBlock(weight, mlp.act, bias=fc.bias)

    def _sparse(self, x: Tensor, idx: Tensor) -> Tensor:
        out = _cols(self.c_proj, self.act(_rows(self.c_fc, x, idx)), idx)
        return self.dropout(out) if hasattr(self, "dropout") else out


def gated_mlp_block(mlp: nn.Module, name: str = "mlp") -> GatedMLPBlock:
    """The estimator block of a gated MLP from its frozen base weights (the LoRA update excluded)."""
    return SparseGatedMLP.block(mlp, name)


def _wrap(
    kind: type[_SparseMLP],
    model: nn.Module,
    state: SparsityState,
    strategy: str,
    sparsity_per_layer: Sequence[float],
    layer_mlps: Sequence[tuple[str, nn.Module]],
    estimator_options: dict[str, object],
) -> list[str]:
    """All checks and estimators first, then all swaps: bad input leaves ``model`` unchanged."""
    if len(sparsity_per_layer) != len(layer_mlps):
        raise ValueError(f"{len(sparsity_per_layer)} sparsities for {len(layer_mlps)} MLPs; pass one per MLP.")
    wrappers: dict[str, _SparseMLP] = {}
    seen: set[str] = set()
    for (name, mlp), sparsity in zip(layer_mlps, sparsity_per_layer):
        if not name or name in seen:
            raise ValueError(f"MLP names must be non-empty and unique, got {name!r} (twice or empty).")
        seen.add(name)
        try:
            found = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"{name!r} is not a submodule of {type(model).__name__}.") from error
        if found is not mlp:
            raise ValueError(f"{name!r} in {type(model).__name__} is not the module passed with it.")
        block = kind.block(mlp, name)
        keep = kept_channels(block.num_channels, sparsity)
        if sparsity == 0:
            continue
        estimator = build_estimator(strategy, block, name, **estimator_options)
        wrappers[name] = kind(mlp, state, estimator, keep, name)
    for name, wrapper in wrappers.items():
        replace_submodule(model, name, wrapper)
    return list(wrappers)


def wrap_gated_mlps(
    model: nn.Module,
    state: SparsityState,
    strategy: str,
    sparsity_per_layer: Sequence[float],
    layer_mlps: Sequence[tuple[str, nn.Module]],
    **estimator_options: object,
) -> list[str]:
    """Replace each named gated MLP of ``model`` with a ``SparseGatedMLP`` at its sparsity.

    ``layer_mlps`` are ``(name in model, module)`` pairs, one per entry of ``sparsity_per_layer``;
    sparsity 0 leaves a layer dense and unwrapped. Every check and every estimator is built before
    the first swap, so bad input leaves ``model`` unchanged. Returns the wrapped names.
    """
    return _wrap(SparseGatedMLP, model, state, strategy, sparsity_per_layer, layer_mlps, estimator_options)


def wrap_plain_mlps(
    model: nn.Module,
    state: SparsityState,
    strategy: str,
    sparsity_per_layer: Sequence[float],
    layer_mlps: Sequence[tuple[str, nn.Module]],
    **estimator_options: object,
) -> list[str]:
    """``wrap_gated_mlps`` for GPT-2 style MLPs (``SparsePlainMLP``)."""
    return _wrap(SparsePlainMLP, model, state, strategy, sparsity_per_layer, layer_mlps, estimator_options)


def unwrap_all(model: nn.Module) -> list[str]:
    """Put every wrapped MLP's original module back (same parameters, same keys); returns the names."""
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, _SparseMLP)]
    for name, module in wrapped:
        if not name:
            raise ValueError(f"The model itself is a {type(module).__name__}; use its .original instead.")
        replace_submodule(model, name, module.original)
    return [name for name, _ in wrapped]
