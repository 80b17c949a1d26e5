"""Contextual-sparse execution of the blocks ``lightning_sft.anatomy.describe`` finds, one mechanism
for every family: the context tokens' frozen products run on the channels an estimator keeps,
everything else (output tokens, padding, every LoRA branch) stays dense.

Each projection of a block gets an instance-level ``forward`` (removed again by ``desparsify``;
nothing in the module tree changes, so parameter names, state-dict keys and ``lora_layers`` are
untouched). Per forward, the first call of the block chooses one index set per channel group
(``ChannelGroup``) from the block input, and then:

* **compact** (the block is a token-wise module: every MLP module): the module's own forward runs
  twice, on the dense rows unchanged and on the context rows with producers returning only the
  kept rows (all slices of a fused projection, in slice order: Phi-3's ``chunk(2)`` still splits
  gate from up) and consumers reading only the kept columns, so intermediates are ``k`` wide;
* **in place** (attention, and MLPs spread over a layer: OPT, BERT): each producer computes the
  context rows' kept output rows and returns zeros in the others; each consumer reads only the
  kept columns of the context rows. The family's own code (RoPE, GQA, norms, softmax) runs as is.

Either way the result equals the dense block whose dropped channels are zeroed for the context
tokens (producer outputs before anything reads them, consumer inputs), with exact input and LoRA
gradients. Pure torch (no Lightning).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sft.anatomy.linear import linear_features
from lightning_sft.anatomy import BlockAnatomy, Slice, projection_base
from lightning_sft.anatomy.modules import instance_forward, restore_forward
from lightning_sft.kernels.token_rows import TokenRows
from lightning_sft.sparsity.estimators import ChannelEstimator
from lightning_sft.sparsity.sparse_products import fusable, fused_sparse_rows, linear_eval, sparse_cols, sparse_rows
from lightning_sft.sparsity.state import SparsityState

OWNER = "_lightning_sft_sparse_block"  # instance attribute marking a module a SparseBlock drives


# -- one block ---------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """One forward's channel choice for a block, shared by all its projections."""

    x: Tensor  # the block input the choice was made on (in place: the producers' shared input)
    rows: TokenRows  # which flat token rows run sparse
    idx: dict[str, Tensor]  # per channel group: the kept channels
    physical: dict[str, Tensor]  # per projection: its kept rows (producer) or columns (consumer)
    compact: bool
    ran: list[str] = field(default_factory=list)
    input_grad: dict[str, bool] = field(default_factory=dict)  # per projection: does its input need a gradient
    pending: tuple[Tensor, dict[str, Tensor]] | None = None  # sibling producers' outputs on one input
    _split: tuple[Tensor, Tensor, Tensor] | None = None  # a producer input and its (context, dense) rows

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(context rows, dense rows) of a producer input; producers sharing one input split it once."""
        if self._split is None or self._split[0] is not x:
            self._split = (x, *self.rows.split(x.reshape(-1, x.shape[-1])))
        return self._split[1], self._split[2]


class SparseBlock:
    """One described block made sparse: its estimators, kept counts and installed forwards.

    Dense (the modules' own forwards, bit for bit) while ``state.active`` is False, no mask is set
    or the mask has no context token. Skipped FLOPs count the input-gradient backward only when the
    output needs a gradient; recomputation under activation checkpointing is counted again.
    """

    def __init__(
        self,
        model: nn.Module,
        anatomy: BlockAnatomy,
        state: SparsityState,
        estimators: dict[str, ChannelEstimator],
        keep: dict[str, int],
    ) -> None:
        self.anatomy = anatomy
        self.name = anatomy.name
        self.state = state
        self.estimators = estimators
        self.keep = keep
        self.modules = {path: model.get_submodule(path) for path in anatomy.projections}
        # Where each projection sits, so one replaced since (LoRA injected later) is taken over.
        self._slots = {path: (model.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2])
                       for path in anatomy.projections}
        self._root = model.get_submodule(anatomy.name)
        self._watch: Any = None
        self.features = {
            path: linear_features(projection_base(module, path, frozen=False)) for path, module in self.modules.items()
        }
        self.region = model.get_submodule(anatomy.region) if anatomy.region else None
        self.activation = model.get_submodule(anatomy.activation) if anatomy.activation else None
        self._producers: dict[str, list[tuple[str, Slice]]] = {}
        self._consumers: dict[str, list[tuple[str, Slice]]] = {}
        for group in anatomy.groups:
            for part in group.producers:
                self._producers.setdefault(part.path, []).append((group.name, part))
            for part in group.consumers:
                self._consumers.setdefault(part.path, []).append((group.name, part))
        self._plan: _Plan | None = None
        self._seen: weakref.ref[Tensor] | None = None  # in place: the last input observed and run dense
        self._saved: dict[int, tuple[nn.Module, Any]] = {}

    # -- installing ----------------------------------------------------------------------------------

    def install(self) -> None:
        """Take over every projection (and the compact region), and watch the block's module, whose
        forward starts before any projection runs, for projections replaced since."""
        targets = [*self.modules.items(), *([("", self.region)] if self.region is not None else [])]
        for path, module in targets:
            if getattr(module, OWNER, None) is not None:
                raise ValueError(f"{self.name}: {path or 'the block'} is already sparse; desparsify(model) first.")
        for path, module in targets:
            self._take_over(path, module)
        self._watch = self._root.register_forward_pre_hook(lambda module, args: self._follow_replacements())

    def _take_over(self, path: str, module: nn.Module) -> None:
        self._saved[id(module)] = (module, instance_forward(module))
        original = module.forward
        if module is self.region:
            module.__dict__["forward"] = partial(self._region_forward, original)
        else:
            module.__dict__["forward"] = partial(self._project, path, original)
        module.__dict__[OWNER] = self

    def _hand_back(self, module: nn.Module) -> None:
        module, forward = self._saved.pop(id(module))
        module.__dict__.pop(OWNER, None)
        restore_forward(module, forward)

    def _follow_replacements(self) -> None:
        """Take over a projection replaced since ``install`` (e.g. wrapped by LoRA injected later)."""
        if self.state.context_mask is None:
            return
        for path, (parent, child) in self._slots.items():
            current = getattr(parent, child)
            if current is not self.modules[path]:
                self._hand_back(self.modules[path])
                self.modules[path] = current
                self._take_over(path, current)

    def remove(self) -> None:
        """Put every module's own forward back."""
        for module, _ in list(self._saved.values()):
            self._hand_back(module)
        if self._watch is not None:
            self._watch.remove()
        self._plan, self._seen, self._watch = None, None, None

    # -- choosing channels ---------------------------------------------------------------------------

    def _tokens(self, x: Tensor, path: str) -> Tensor:
        """``x`` as (batch, seq, features) of the batch's tokens; a clear error for anything else."""
        mask = self.state.context_mask
        if x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x
        if x.ndim == 2 and x.shape[0] == mask.numel():  # OPT flattens the tokens first
            return x.view(*mask.shape, x.shape[-1])
        raise ValueError(
            f"{path or self.name} was called on {tuple(x.shape)}, which does not hold the {tuple(mask.shape)} tokens"
            " of state.context_mask: set the mask of this batch, and call each projection of the block once on the"
            " layer's tokens (not in chunks, not on another sequence as in cross-attention)."
        )

    def _choose(self, x3: Tensor) -> tuple[dict[str, Tensor], Tensor] | None:
        """Observe (calibration) and, when active, choose each group's channels; None = run dense."""
        state = self.state
        state.observe(self.name, x3)
        if not state.active:
            return None
        for path, module in self.modules.items():
            projection_base(module, path)  # merged since, or unfrozen: refuse rather than compute wrong
        mask = state.checked_mask(x3, self.name)
        flat = mask.reshape(-1)
        if not bool(flat.any()):
            return None
        idx = {name: state.select(estimator, x3, self.keep[name], mask) for name, estimator in self.estimators.items()}
        return idx, (torch.ones_like(flat) if state.sparse_output_tokens else flat)

    def _physical(self, idx: dict[str, Tensor]) -> dict[str, Tensor]:
        physical = {}
        for path in self.modules:
            parts = self._producers.get(path) or self._consumers[path]
            physical[path] = torch.cat([part.physical(idx[group]) for group, part in parts])
        return physical

    def _needs(self) -> str:
        return f"contextual sparsity needs its forward to call each of {', '.join(self.modules)} once on the layer's tokens"

    def _check_complete(self) -> None:
        """Refuse a forward that left the last plan unfinished (a projection skipped or bypassed)."""
        plan, self._plan = self._plan, None
        if plan is not None and sorted(plan.ran) != sorted(self.modules):
            raise RuntimeError(
                f"{self.name} ran only {plan.ran} sparse in its last forward (or that forward raised before the"
                f" others); {self._needs()}."
            )

    # -- the compact path ----------------------------------------------------------------------------

    def _region_forward(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        x = args[0] if args else None
        if state.context_mask is None or not (state.active or state.observing) or not isinstance(x, Tensor):
            return original(*args, **kwargs)
        x3 = self._tokens(x, "")
        chosen = self._choose(x3)
        if chosen is None:
            return original(*args, **kwargs)
        idx, flat = chosen
        rows = TokenRows(flat)
        lead = x.shape[:-1]

        def parts(value: Any) -> tuple[Any, Any]:
            """A token-shaped argument's (context, dense) rows, kept 3-D (one sample) for the family's code."""
            if isinstance(value, Tensor) and value.shape[:-1] == lead:
                context, dense = rows.split(value.reshape(-1, value.shape[-1]))
                return context.unsqueeze(0), dense.unsqueeze(0)
            return value, value

        split_args = [parts(a) for a in args]
        split_kwargs = {key: parts(value) for key, value in kwargs.items()}
        plan = _Plan(x, rows, idx, self._physical(idx), compact=True)
        self._plan = plan
        needs = self._needs()
        try:
            sparse = original(*(a[0] for a in split_args), **{k: v[0] for k, v in split_kwargs.items()})
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:  # e.g. a forward that reads a projection's weight by hand
            raise RuntimeError(f"{self.name} failed on its sparse (k-wide) path after {plan.ran}: {needs}.") from error
        finally:
            self._plan = None
        if sorted(plan.ran) != sorted(self.modules):
            raise RuntimeError(f"{self.name} ran {plan.ran} on the context tokens; {needs}.")
        if rows.other_rows:
            dense = original(*(a[1] for a in split_args), **{k: v[1] for k, v in split_kwargs.items()})
        else:
            dense = sparse.new_empty(1, 0, sparse.shape[-1])
        out = rows.merge(sparse.squeeze(0), dense.squeeze(0))
        self._account(rows, idx, plan.input_grad)
        return out.view(*lead, out.shape[-1])

    # -- the projections -----------------------------------------------------------------------------

    def _project(self, path: str, original: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        plan = self._plan
        if plan is not None and plan.compact:
            plan.ran.append(path)
            plan.input_grad[path] = x.requires_grad
            module = self.modules[path]
            if path in self._producers:
                return self._produce(plan, path, x)
            return sparse_cols(module, x, plan.physical[path])
        state = self.state
        if self.region is not None or state.context_mask is None or not (state.active or state.observing):
            return original(x, *args, **kwargs)
        if path in self._producers:
            plan = self._in_place_plan(path, x)
        elif plan is not None and plan.rows.rows != x.reshape(-1, x.shape[-1]).shape[0]:
            self._tokens(x, path)  # raises: not the layer's tokens
        if plan is None:
            return original(x, *args, **kwargs)
        if path in plan.ran:
            raise RuntimeError(f"{self.name}: {path} was called twice in one forward; {self._needs()}.")
        return self._in_place(path, original, plan, x)

    def _in_place_plan(self, path: str, x: Tensor) -> _Plan | None:
        """The plan of the forward this producer call belongs to: the current one while its producers
        share this input, else a new choice (a second call of a producer, as in a recompute, starts one)."""
        plan = self._plan
        if plan is not None and plan.x is x and path not in plan.ran:
            return plan
        if plan is None and self._seen is not None and self._seen() is x:  # observed already, chosen dense
            return None
        self._check_complete()
        self._plan, self._seen = None, None
        chosen = self._choose(self._tokens(x, path))
        if chosen is None:
            self._seen = weakref.ref(x)
            return None
        idx, flat = chosen
        self._plan = _Plan(x, TokenRows(flat), idx, self._physical(idx), compact=False)
        return self._plan

    def _in_place(self, path: str, original: Any, plan: _Plan, x: Tensor) -> Tensor:
        module, columns = self.modules[path], plan.physical[path]
        lead = x.shape[:-1]
        if path in self._producers:
            context, dense = plan.split(x)
            width = self.features[path][1]
            out = plan.rows.merge(self._produce(plan, path, context), original(dense), columns, width)
        else:
            context, dense = plan.rows.split(x.reshape(-1, x.shape[-1]), columns)
            out = plan.rows.merge(sparse_cols(module, context, columns), original(dense))
        plan.ran.append(path)
        plan.input_grad[path] = x.requires_grad
        if len(plan.ran) == len(self.modules):  # the block's forward is done: account, and hold nothing
            self._account(plan.rows, plan.idx, plan.input_grad)
            self._plan = None
        return out.view(*lead, out.shape[-1])

    def _produce(self, plan: _Plan, path: str, a: Tensor) -> Tensor:
        """A producer's kept rows for input rows ``a``; the first of several producers reading the same
        ``a`` computes them all with shared GEMMs (``fused_sparse_rows``) and leaves the others pending."""
        if plan.pending is not None and plan.pending[0] is a and path in plan.pending[1]:
            return plan.pending[1].pop(path)
        module = self.modules[path]
        siblings = [p for p in self._producers if p != path and p not in plan.ran and fusable(self.modules[p])]
        if not siblings or not fusable(module):
            return sparse_rows(module, a, plan.physical[path])
        paths = [path, *siblings]
        outs = fused_sparse_rows([self.modules[p] for p in paths], a, [plan.physical[p] for p in paths])
        plan.pending = (a, dict(zip(paths[1:], outs[1:])))
        return outs[0]

    # -- accounting ----------------------------------------------------------------------------------

    def _account(self, rows: TokenRows, idx: dict[str, Tensor], input_grad: dict[str, bool]) -> None:
        """Skipped multiply-adds of the frozen products, 2 FLOPs each; a projection's input-gradient
        product (as costly as its forward) only where its input needs a gradient, as in the dense model."""
        skipped = 0
        for path, (fan_in, out) in self.features.items():
            parts = self._producers.get(path)
            if parts:
                kept = sum(part.index.shape[1] * idx[group].numel() for group, part in parts)
                macs = fan_in * (out - kept)
            else:
                kept = sum(part.index.shape[1] * idx[group].numel() for group, part in self._consumers[path])
                macs = (fan_in - kept) * out
            skipped += macs * (2 if input_grad.get(path, False) else 1)
        self.state.skipped_flops += 2 * skipped * rows.context_rows
        for group in self.anatomy.groups:
            self.state.layer_sparsity[self.anatomy.key(group.name)] = 1.0 - idx[group.name].numel() / group.channels

    # -- calibration ---------------------------------------------------------------------------------

    @property
    def estimator(self) -> ChannelEstimator:
        """An MLP block's one estimator (what ``calibration.mlp_errors`` reads)."""
        return self.estimators["mlp"]

    @property
    def intermediate(self) -> int:
        return self.anatomy.intermediate

    @torch.no_grad()
    def dropped_output(self, rows: Tensor, idx: Tensor) -> Tensor:
        """What an MLP's channels outside ``idx`` add to the output for token ``rows`` (N, hidden): the
        error running them sparse makes (LoRA included, no dropout, so calibration draws no RNG)."""
        (group,) = self.anatomy.groups
        outs = [
            linear_eval(self.modules[part.path], rows).index_select(-1, part.index[:, 0].to(rows.device))
            for part in group.producers
        ]
        hidden = self.activation(outs[0])
        if len(outs) == 2:
            hidden = hidden * outs[1]
        hidden[..., idx] = 0
        (consumer,) = group.consumers
        module = self.modules[consumer.path]
        fan_in = self.features[consumer.path][0]
        full = hidden.new_zeros(*hidden.shape[:-1], fan_in).index_copy_(-1, consumer.index[:, 0].to(rows.device), hidden)
        return linear_eval(module, full, bias=False)

    def __repr__(self) -> str:
        kept = ", ".join(f"{name} {self.keep[name]}/{g.channels}" for name, g in zip(self.keep, self.anatomy.groups))
        estimator = type(next(iter(self.estimators.values()))).__name__
        return f"SparseBlock({self.name!r}, {self.anatomy.layout}, keep {kept}, estimator={estimator})"
