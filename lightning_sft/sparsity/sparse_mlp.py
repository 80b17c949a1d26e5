"""Contextual-sparse MLPs (SparseLoRA): the frozen projections of the context tokens run on the
intermediate channels an estimator keeps, everything else (and every LoRA branch) stays dense.

Pure torch (no Lightning): a callback owns one ``SparsityState``, wraps the MLPs with
``wrap_gated_mlps`` / ``wrap_plain_mlps`` / ``wrap_bert_mlps`` and sets the state before each
forward. See ``docs/sparsity_estimators.md``.

The wrapper registers the original module's children under their own names, so parameter and
state-dict keys do not change; the original module is kept outside the module tree and
``unwrap_all`` puts it back.
"""

from __future__ import annotations

from collections.abc import Sequence
import time
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_sft.adapters.injection import replace_submodule
from lightning_sft.adapters.linear_layers import _conv1d_type, linear_features, weight_is_transposed
from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.adapters.quantization import (
    dense_view,
    is_quantized,
    quantized_cols_matmul,
    quantized_linear,
    quantized_rows_matmul,
)
from lightning_sft.kernels import cols_matmul, rows_matmul
from lightning_sft.kernels.token_rows import TokenRows
from lightning_sft.sparsity.blocks import Block, GatedMLPBlock, MLPBlock
from lightning_sft.sparsity.calibration import InputStatistics
from lightning_sft.sparsity.estimators import ChannelEstimator, build_estimator
from lightning_sft.sparsity.schedule import kept_channels
from lightning_sft.sparsity.sparse_flops import mlp_flops


@dataclass
class SparsityState:
    """What every wrapped layer of one model reads each forward, and what it reports back.

    A callback sets ``active`` and ``context_mask`` (bool ``(B, S)``; True = context token to run
    sparse, False = output token or padding, kept dense) before each forward, and reads then
    ``reset``s the accumulators after each step. ``sparse_output_tokens`` runs every token sparse
    (the channels are still chosen from the context tokens only). While ``observing`` (dense
    calibration steps), each wrapped layer adds its context-token inputs to ``statistics[name]``.
    """

    active: bool = False
    context_mask: Tensor | None = None
    sparse_output_tokens: bool = False
    observing: bool = False
    statistics: dict[str, InputStatistics] = field(default_factory=dict)
    skipped_flops: float = 0.0
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    _estimator_seconds: float = 0.0
    _estimator_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def reset(self) -> None:
        """Clear the per-step accumulators (not the switches)."""
        self.skipped_flops = 0.0
        self.layer_sparsity = {}
        self._estimator_seconds = 0.0
        self._estimator_events = []

    def checked_mask(self, x: Tensor, name: str) -> Tensor:
        """``context_mask`` on ``x``'s device, checked against a (B, S, H) input of layer ``name``."""
        mask = self.context_mask.to(x.device)
        if x.ndim != 3 or mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"{name}: state.context_mask must be a bool (batch, seq) tensor matching the layer input"
                f" {tuple(x.shape)}, got {mask.dtype} {tuple(mask.shape)}."
            )
        return mask

    def observe(self, name: str, x: Tensor) -> None:
        """Calibration: add layer ``name``'s context-token inputs ``x`` to its statistics."""
        if not self.observing or self.context_mask is None:
            return
        mask = self.checked_mask(x, name)
        self.statistics.setdefault(name, InputStatistics()).update(x, mask)

    def select(self, estimator: ChannelEstimator, x: Tensor, k: int, mask: Tensor) -> Tensor:
        """``estimator.select``, timed (CUDA events on GPU, so no synchronisation here)."""
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            idx = estimator.select(x, k, context_mask=mask)
            end.record()
            self._estimator_events.append((start, end))
            return idx
        start_time = time.perf_counter()
        idx = estimator.select(x, k, context_mask=mask)
        self._estimator_seconds += time.perf_counter() - start_time
        return idx

    def estimator_seconds(self) -> float:
        """Time spent choosing channels since ``reset`` (waits for the last CUDA event)."""
        if self._estimator_events:
            self._estimator_events[-1][1].synchronize()
        gpu = sum(start.elapsed_time(end) for start, end in self._estimator_events) / 1000.0
        return self._estimator_seconds + gpu


def _check_projection(name: str, layer: nn.Module) -> nn.Module:
    """The base layer of a projection; a clear error for what the kernels cannot run."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    if isinstance(layer, LoRALinear) and layer.merged:
        raise ValueError(
            f"{name} is a merged LoRA layer: its base weight holds the adapter, which would be sparsified."
            " Call unmerge_adapter(model) before using contextual sparsity."
        )
    if type(base) not in (nn.Linear, _conv1d_type()) and not is_quantized(base):
        raise TypeError(
            f"{name} is a {type(base).__name__}; contextual sparsity supports plain nn.Linear, transformers Conv1D or"
            " 4-bit bitsandbytes Linear4bit (quantize_base) projections, optionally wrapped in LoRALinear."
        )
    if base.weight.requires_grad:
        raise ValueError(
            f"{name}.weight requires grad; sparse projections need a frozen base"
            " (inject LoRA or freeze the base model first)."
        )
    return base


class MLPLayout(NamedTuple):
    """The child names of one MLP layout: projections input side first, the activation, and an
    optional dropout applied to the output (a module, or a float probability applied functionally)."""

    projections: tuple[str, ...]
    activation: str
    dropout: str | None = None
    families: str = ""

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` has exactly these children: one with more (a whole OPT decoder layer
        holds fc1/fc2/activation_fn too) computes something the sparse path would skip."""
        children = {child for child, _ in module.named_children()}
        required = {*self.projections, self.activation}
        if self.dropout is not None:
            dropout = getattr(module, self.dropout, None)
            if not isinstance(dropout, (nn.Module, int, float)) or isinstance(dropout, bool):
                return False
        return required <= children <= required | {self.dropout}

    def __str__(self) -> str:
        names = ", ".join((*self.projections, self.activation, *([self.dropout] if self.dropout else [])))
        return f"{names} ({self.families})" if self.families else names


def _layouts(kind: type[_SparseMLP]) -> tuple[MLPLayout, ...]:
    """The layouts ``kind`` wraps: its ``layouts`` table, or the one its class attributes name."""
    return getattr(kind, "layouts", None) or (MLPLayout(kind.projections, kind.activation),)


def _check_mlp(mlp: nn.Module, name: str, kind: type[_SparseMLP]) -> list[nn.Module]:
    """The base layers of ``mlp``'s projections under ``kind`` (input side first), checked for a
    shape the sparse path can compute: hidden -> intermediate (the first, and all but the last) ->
    hidden (the last, if there are several; BERT's output projection sits in a sibling)."""
    if isinstance(mlp, _SparseMLP):
        raise ValueError(f"{name} is already a {type(mlp).__name__}; unwrap_all(model) first.")
    layout = next((layout for layout in _layouts(kind) if layout.matches(mlp)), None)
    if layout is None:
        children = ", ".join(child for child, _ in mlp.named_children()) or "none"
        raise TypeError(
            f"{name} ({type(mlp).__name__}) is not a {kind.family} MLP: its child modules ({children}) match"
            f" none of the supported layouts: {'; '.join(map(str, _layouts(kind)))}."
        )
    if next(mlp.parameters(recurse=False), None) is not None or next(mlp.buffers(recurse=False), None) is not None:
        raise TypeError(f"{name} ({type(mlp).__name__}) has parameters of its own; only its projections are supported.")
    bases = [_check_projection(f"{name}.{child}", getattr(mlp, child)) for child in layout.projections]
    hidden, intermediate = linear_features(bases[0])
    shapes = [linear_features(base) for base in bases]
    expected = [(hidden, intermediate)] * max(len(shapes) - 1, 1) + [(intermediate, hidden)] * (len(shapes) > 1)
    if shapes != expected:
        raise ValueError(
            f"{name}: {', '.join(layout.projections)} with (in, out) features {shapes} do not form a"
            " hidden -> intermediate -> hidden MLP."
        )
    return bases


def _linear_eval(layer: nn.Module, x: Tensor, bias: bool = True) -> Tensor:
    """A projection (LoRA branch included) as in eval mode: no dropout, whatever ``training`` is."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    if is_quantized(base):
        out = quantized_linear(base, x, bias)
    else:
        weight = base.weight.t() if weight_is_transposed(base) else base.weight
        out = F.linear(x.to(weight.dtype), weight, base.bias if bias else None)
    if isinstance(layer, LoRALinear) and not layer.merged:
        lora = F.linear(F.linear(x.to(layer.lora_A.dtype), layer.lora_A), layer.lora_B) * layer.scaling
        out = out + lora.to(out.dtype)
    return out


def _rows(layer: nn.Module, x: Tensor, idx: Tensor) -> Tensor:
    """Output channels ``idx`` of a projection; a LoRA branch stays dense: ``(x A^T s) B[idx]^T``."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    if is_quantized(base):  # decodes only rows idx of the 4-bit weight
        out = quantized_rows_matmul(x, base, idx)
    else:
        out = rows_matmul(x, base.weight, idx, base.bias, transposed=weight_is_transposed(base), check_idx=False)
    if not isinstance(layer, LoRALinear):
        return out
    h = F.linear(layer.dropout(x).to(layer.lora_A.dtype), layer.lora_A) * layer.scaling
    return out + F.linear(h, layer.lora_B.index_select(0, idx)).to(out.dtype)


def _cols(layer: nn.Module, h: Tensor, idx: Tensor) -> Tensor:
    """A projection of ``h`` that holds only input channels ``idx`` (the others are zero):
    the LoRA branch is ``(h A[:, idx]^T s) B^T``, its dense value on the zero-filled input."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    if is_quantized(base):  # decodes only columns idx of the 4-bit weight
        out = quantized_cols_matmul(h, base, idx)
    else:
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
        self.training = mlp.training  # the original's mode, which train() below keeps in step

    @classmethod
    def block(cls, mlp: nn.Module, name: str = "mlp") -> Block:
        """The estimator block of ``mlp`` from its frozen base weights (the LoRA update excluded)."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> _SparseMLP:
        # The original runs the dense tokens from outside the module tree, where model.train() does
        # not reach it; its own flag matters wherever its forward reads ``self.training``.
        self.__dict__["_original"].training = mode
        return super().train(mode)

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
        if state.context_mask is None:
            return self.original(x)
        state.observe(self.name, x)
        if not state.active:
            return self.original(x)
        mask = state.checked_mask(x, self.name)
        context = int(mask.sum())
        if context == 0:
            return self.original(x)
        for child_name in self.projections:
            _check_projection(f"{self.name}.{child_name}", getattr(self, child_name))
        idx = state.select(self.estimator, x, self.keep, mask)
        if state.sparse_output_tokens:
            out = self._sparse(x, idx)
            context, dense = mask.numel(), 0
        else:
            out, dense = self._split(x, mask, idx), mask.numel() - context
        self._account(context, dense, idx.numel(), out.requires_grad)
        return out

    @torch.no_grad()
    def dropped_output(self, rows: Tensor, idx: Tensor) -> Tensor:
        """What the channels outside ``idx`` add to the output for token ``rows`` (N, hidden): the
        error running them sparse makes (LoRA included, no dropout, so calibration draws no RNG)."""
        first = _linear_eval(getattr(self, self.projections[0]), rows)
        hidden = getattr(self, self.activation)(first)
        if self.gated:
            hidden = hidden * _linear_eval(getattr(self, self.projections[1]), rows)
        dropped = torch.ones(hidden.shape[-1], dtype=torch.bool, device=hidden.device)
        dropped[idx] = False
        return _linear_eval(getattr(self, self.projections[-1]), hidden * dropped, bias=False)

    def _sparse(self, x: Tensor, idx: Tensor) -> Tensor:
        raise NotImplementedError

    def _split(self, x: Tensor, mask: Tensor, idx: Tensor) -> Tensor:
        """Context tokens sparse, the rest through the original module, merged back in place
        (``TokenRows``: row views for the usual few runs, every row written once each way)."""
        rows = TokenRows(mask.reshape(-1))
        context, other = rows.split(x.reshape(-1, x.shape[-1]))
        sparse_out = self._sparse(context, idx)
        dense_out = self.original(other) if rows.other_rows else sparse_out.new_empty(0, sparse_out.shape[-1])
        out = rows.merge(sparse_out, dense_out)
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
        return GatedMLPBlock(dense_view(gate), dense_view(up), mlp.act_fn, gate_bias=gate.bias, up_bias=up.bias)

    def _sparse(self, x: Tensor, idx: Tensor) -> Tensor:
        h = self.act_fn(_rows(self.gate_proj, x, idx)) * _rows(self.up_proj, x, idx)
        return _cols(self.down_proj, h, idx)


class SparsePlainMLP(_SparseMLP):
    """A plain MLP, ``dropout(fc2(act(fc1(x))))``, under whichever of ``layouts`` its children
    follow (the names vary by family; weights nn.Linear or GPT-2's Conv1D): kept channels are
    output channels of fc1 and input channels of fc2, whose bias is added in full.
    ``projections``, ``activation`` and ``layout`` are the wrapped module's."""

    layouts: ClassVar[tuple[MLPLayout, ...]] = (
        MLPLayout(("c_fc", "c_proj"), "act", "dropout", "GPT-2, GPT-Neo, GPTBigCode"),
        MLPLayout(("c_fc", "c_proj"), "act", "residual_dropout", "StarCoder2"),
        MLPLayout(("dense_h_to_4h", "dense_4h_to_h"), "act", None, "GPT-NeoX, Pythia"),
        MLPLayout(("fc_in", "fc_out"), "act", "dropout", "GPT-J, CodeGen"),
        MLPLayout(("fc1", "fc2"), "activation_fn", None, "Phi, CLIP/SigLIP vision towers"),
    )
    gated = False
    family = "plain"

    def __init__(self, mlp: nn.Module, state: SparsityState, estimator: ChannelEstimator, keep: int, name: str) -> None:
        super().__init__(mlp, state, estimator, keep, name)
        self.layout = self.layout_of(mlp)
        self.projections, self.activation = self.layout.projections, self.layout.activation

    @classmethod
    def layout_of(cls, mlp: nn.Module) -> MLPLayout | None:
        """The first of ``layouts`` that ``mlp``'s children match exactly, if any."""
        return next((layout for layout in cls.layouts if layout.matches(mlp)), None)

    @classmethod
    def block(cls, mlp: nn.Module, name: str = "mlp") -> MLPBlock:
        fc, _ = _check_mlp(mlp, name, cls)
        weight = fc.weight.t() if weight_is_transposed(fc) else dense_view(fc)
        return MLPBlock(weight, getattr(mlp, cls.layout_of(mlp).activation), bias=fc.bias)

    def _sparse(self, x: Tensor, idx: Tensor) -> Tensor:
        fc1, fc2 = (getattr(self, child) for child in self.projections)
        out = _cols(fc2, getattr(self, self.activation)(_rows(fc1, x, idx)), idx)
        if self.layout.dropout is None:
            return out
        dropout = getattr(self.original, self.layout.dropout)
        return dropout(out) if isinstance(dropout, nn.Module) else F.dropout(out, float(dropout), self.training)


@dataclass
class _Handover:
    """One forward's channel choice, from a ``SparseBertMLP`` to its sibling ``output.dense``."""

    hidden: Tensor  # the intermediate output: zero outside ``idx`` on the sparse rows
    idx: Tensor
    sparse_pos: Tensor  # flat (batch * seq) positions run sparse
    dense_pos: Tensor
    narrowed: bool = False


class SparseBertMLP(_SparseMLP):
    """A BERT-style encoder MLP, split over two children of a layer: ``intermediate``
    (``act(dense(x))``) and ``output`` (BERT: ``LayerNorm(dropout(dense(h)) + x)``).

    The wrapper takes ``intermediate``'s place (its children keep their names, so parameter names
    do not change) and computes the sparse tokens' kept rows of ``intermediate.dense``, zero in the
    other channels. ``output`` stays in place and runs its own forward (dropout, LayerNorm and
    residual stay the family's); for its ``dense`` call on exactly that tensor, one-shot hooks hand
    the projection only the dense tokens and add the sparse tokens' product with the kept columns.
    Both products skip the dropped channels; the result equals the dense layer with them zeroed.
    Which tokens are sparse is the context mask's choice (for an encoder: ``token_mask_fn``).
    """

    layouts: ClassVar[tuple[MLPLayout, ...]] = (
        MLPLayout(("dense",), "intermediate_act_fn", None, "BERT-style intermediate: BERT, RoBERTa, ELECTRA"),
    )
    projections = ("dense",)
    activation = "intermediate_act_fn"
    gated = False
    family = "BERT-style"

    def __init__(self, layer: nn.Module, state: SparsityState, estimator: ChannelEstimator, keep: int, name: str) -> None:
        """``layer`` holds ``intermediate`` and ``output``; ``name`` is the wrapper's own
        (``<layer>.intermediate``), under which it reports."""
        self._check_layer(layer, name)
        super().__init__(layer.intermediate, state, estimator, keep, name)
        self.__dict__["_output"] = layer.output  # a sibling: kept out of this module's tree
        self._handles: list[RemovableHandle] = []
        self._selected: Tensor | None = None

    @classmethod
    def holds(cls, layer: nn.Module) -> bool:
        """Whether ``layer`` has an ``intermediate`` of this layout and an ``output`` with a ``dense``."""
        intermediate, output = getattr(layer, "intermediate", None), getattr(layer, "output", None)
        return (
            isinstance(intermediate, nn.Module)
            and cls.layouts[0].matches(intermediate)
            and isinstance(output, nn.Module)
            and isinstance(getattr(output, "dense", None), nn.Module)
        )

    @classmethod
    def _check_layer(cls, layer: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
        """The base layers of ``intermediate.dense`` and ``output.dense``, checked as one MLP."""
        if not cls.holds(layer):
            raise TypeError(
                f"{name}: {type(layer).__name__} is not a BERT-style layer: it needs an `intermediate` with exactly"
                " `dense` and `intermediate_act_fn`, and an `output` with a `dense` projection."
            )
        chunk = getattr(layer, "chunk_size_feed_forward", 0)
        if chunk:
            raise ValueError(
                f"{name}: {type(layer).__name__} runs its MLP in chunks of {chunk} tokens, which the (batch, seq)"
                " context mask cannot follow; set config.chunk_size_feed_forward = 0."
            )
        (fc1,) = _check_mlp(layer.intermediate, name, cls)
        fc2 = _check_projection(cls._output_name(name), layer.output.dense)
        hidden, intermediate = linear_features(fc1)
        if linear_features(fc2) != (intermediate, hidden):
            raise ValueError(
                f"{name}: intermediate.dense {(hidden, intermediate)} and output.dense {linear_features(fc2)}"
                " (in, out) features do not form a hidden -> intermediate -> hidden MLP."
            )
        return fc1, fc2

    @staticmethod
    def _output_name(name: str) -> str:
        return f"{name.rpartition('.')[0] or name}.output.dense"

    @classmethod
    def block(cls, layer: nn.Module, name: str = "intermediate") -> MLPBlock:
        fc1, _ = cls._check_layer(layer, name)
        return MLPBlock(dense_view(fc1), layer.intermediate.intermediate_act_fn, bias=fc1.bias)

    def forward(self, x: Tensor) -> Tensor:
        self._release()  # hooks left by a forward that raised before reaching output.dense
        self._selected = None
        out = super().forward(x)
        if self._selected is not None:
            self._hand_over(out, self._selected)
            self._selected = None
        return out

    def _sparse(self, x: Tensor, idx: Tensor) -> Tensor:
        self._selected = idx
        kept = self.intermediate_act_fn(_rows(self.dense, x, idx))
        return kept.new_zeros(*kept.shape[:-1], self.intermediate).index_copy(kept.ndim - 1, idx, kept)

    @torch.no_grad()
    def dropped_output(self, rows: Tensor, idx: Tensor) -> Tensor:
        hidden = self.intermediate_act_fn(_linear_eval(self.dense, rows))
        dropped = torch.ones(hidden.shape[-1], dtype=torch.bool, device=hidden.device)
        dropped[idx] = False
        return _linear_eval(self.__dict__["_output"].dense, hidden * dropped, bias=False)

    def _hand_over(self, hidden: Tensor, idx: Tensor) -> None:
        """Hook ``output.dense`` for its next call, which must be on ``hidden``."""
        rows = self.state.context_mask.to(hidden.device).reshape(-1)
        if self.state.sparse_output_tokens:
            rows = torch.ones_like(rows)
        dense = self.__dict__["_output"].dense  # looked up now: LoRA may have replaced it since wrapping
        _check_projection(self._output_name(self.name), dense)
        plan = _Handover(hidden, idx, rows.nonzero().squeeze(1), (~rows).nonzero().squeeze(1))
        self._handles = [
            dense.register_forward_pre_hook(partial(self._narrow, plan)),
            dense.register_forward_hook(partial(self._complete, plan)),
        ]

    def _narrow(self, plan: _Handover, module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...] | None:
        if plan.narrowed:  # the call that took this hand-over raised: dense from here on
            self._release()
            return None
        if not args or args[0] is not plan.hidden:
            self._release()
            raise RuntimeError(
                f"{self._output_name(self.name)} was called on something other than {self.name}'s output; a sparse"
                " BERT-style MLP needs output.dense(intermediate(x)) as in BertLayer."
            )
        plan.narrowed = True
        flat = plan.hidden.reshape(-1, plan.hidden.shape[-1])
        return (flat.index_select(0, plan.dense_pos), *args[1:])

    def _complete(self, plan: _Handover, module: nn.Module, args: tuple[object, ...], output: Tensor) -> Tensor:
        self._release()
        flat = plan.hidden.reshape(-1, plan.hidden.shape[-1])
        sparse = _cols(module, flat.index_select(0, plan.sparse_pos).index_select(1, plan.idx), plan.idx)
        out = sparse.new_zeros(flat.shape[0], sparse.shape[-1]).index_copy(0, plan.sparse_pos, sparse)
        if plan.dense_pos.numel():
            out = out.index_copy(0, plan.dense_pos, output.to(out.dtype))
        return out.view(*plan.hidden.shape[:-1], out.shape[-1])

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


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
    child: str = "",
) -> list[str]:
    """All checks and estimators first, then all swaps: bad input leaves ``model`` unchanged.
    With ``child``, the wrapper of each named module takes that child's place and name."""
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
        slot = f"{name}.{child}" if child else name
        block = kind.block(mlp, slot)
        keep = kept_channels(block.num_channels, sparsity)
        if sparsity == 0:
            continue
        estimator = build_estimator(strategy, block, slot, **estimator_options)
        wrappers[slot] = kind(mlp, state, estimator, keep, slot)
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
    """``wrap_gated_mlps`` for plain MLPs (``SparsePlainMLP``: GPT-2, GPT-NeoX, GPT-J, Phi, StarCoder2 layouts)."""
    return _wrap(SparsePlainMLP, model, state, strategy, sparsity_per_layer, layer_mlps, estimator_options)


def wrap_bert_mlps(
    model: nn.Module,
    state: SparsityState,
    strategy: str,
    sparsity_per_layer: Sequence[float],
    layer_mlps: Sequence[tuple[str, nn.Module]],
    **estimator_options: object,
) -> list[str]:
    """``wrap_gated_mlps`` for BERT-style encoder layers (``SparseBertMLP``): ``layer_mlps`` name
    the layers that hold ``intermediate`` and ``output``; each wrapper takes the place of the
    layer's ``intermediate`` and is named ``<layer>.intermediate`` (the returned names)."""
    return _wrap(
        SparseBertMLP, model, state, strategy, sparsity_per_layer, layer_mlps, estimator_options, child="intermediate"
    )


def unwrap_all(model: nn.Module) -> list[str]:
    """Put every wrapped MLP's original module back (same parameters, same keys); returns the names."""
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, _SparseMLP)]
    for name, module in wrapped:
        if not name:
            raise ValueError(f"The model itself is a {type(module).__name__}; use its .original instead.")
        replace_submodule(model, name, module.original)
    return [name for name, _ in wrapped]
