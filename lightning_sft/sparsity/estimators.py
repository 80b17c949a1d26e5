"""Channel selection for contextual sparsity (SparseLoRA): which channels of the frozen projections
a batch needs, chosen per layer and per step.

Pure torch (no Lightning): a callback builds one estimator per block with ``build_estimator``,
calls ``select`` on the block's input hidden states each step and slices the frozen weights with
the returned indices. Index maps, scoring rules and the cache format are described in
``docs/sparsity_estimators.md``.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from lightning_sft.sparsity.blocks import Block, GatedMLPBlock, MLPBlock, QKBlock
from lightning_sft.sparsity.svd_cache import LowRankFactors, SVDCache, _check_rank, svd_factors, whitened_factors


def recall(selected_idx: Tensor, oracle_idx: Tensor) -> float:
    """Fraction of the oracle's channels that the estimator also selected."""
    if oracle_idx.numel() == 0:
        raise ValueError("oracle_idx is empty; recall is undefined.")
    return torch.isin(oracle_idx, selected_idx.to(oracle_idx.device)).sum().item() / oracle_idx.numel()


# -- estimators --------------------------------------------------------------------------------------


def _check_mask(mask: Tensor, shape: tuple[int, ...]) -> None:
    if mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise ValueError(
            f"context_mask must be a bool tensor of shape {shape} (True = context token), "
            f"got {mask.dtype} {tuple(mask.shape)}."
        )


def _pool(x: Tensor, context_mask: Tensor | None) -> Tensor:
    """One fp32 vector per sample: the mean of its context tokens (3-D input) or ``x`` itself (2-D).

    Samples without context tokens are dropped, since they have nothing to sparsify.
    """
    if x.ndim == 2:
        if context_mask is not None:
            raise ValueError("A pooled (2-D) input takes no context_mask.")
        return x.float()
    if x.ndim != 3:
        raise ValueError(f"x must be (batch, seq, hidden) or pooled (batch, hidden), got shape {tuple(x.shape)}.")
    if context_mask is None:
        return x.float().mean(dim=1)
    _check_mask(context_mask, tuple(x.shape[:2]))
    weights = context_mask.to(x.dtype)
    counts = context_mask.sum(dim=1)
    keep = counts > 0
    if not bool(keep.any()):
        raise ValueError("context_mask selects no token: nothing to sparsify in this batch (run it dense).")
    sums = (weights.unsqueeze(1) @ x).squeeze(1).float()
    return sums[keep] / counts[keep, None].float()


def _tokens(x: Tensor, context_mask: Tensor | None) -> Tensor:
    """The context tokens of ``x`` as fp32 rows (N, hidden); 2-D ``x`` is already one row per token."""
    if x.ndim not in (2, 3):
        raise ValueError(f"x must be (batch, seq, hidden) or (tokens, hidden), got shape {tuple(x.shape)}.")
    if context_mask is not None:
        _check_mask(context_mask, tuple(x.shape[:-1]))
        rows = x[context_mask]
    else:
        rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:
        raise ValueError("No context token to score: nothing to sparsify in this batch (run it dense).")
    return rows.float()


def _qk_scores(q_sq: Tensor, k_sq: Tensor, block: QKBlock) -> Tensor:
    """Score of kv channel (g, d): ||q_{group g, d}|| * ||k_{g, d}||, the Frobenius norm of dim d's
    contribution to the score matrices of every query head in group g."""
    q_group = q_sq.reshape(block.num_kv_heads, block.group_size, block.head_dim).sum(dim=1)
    return (q_group.sqrt() * k_sq.reshape(block.num_kv_heads, block.head_dim).sqrt()).reshape(-1)


class ChannelEstimator(ABC):
    """Chooses the channels of one block to keep for a batch.

    ``prepare`` runs once per layer on the frozen weights; ``select`` runs every step and returns
    sorted, unique channel indices (on ``x``'s device). A strategy implements ``scores`` (higher =
    keep); ``select`` applies the block's structured, deterministic top-k to them.
    """

    _block: Block | None = None

    def prepare(self, block: Block, name: str = "") -> None:
        """Build per-layer state from ``block``'s frozen weights; ``name`` identifies the layer."""
        self._block = block

    @property
    def block(self) -> Block:
        if self._block is None:
            raise RuntimeError(f"{type(self).__name__}.prepare(block) must run before select().")
        return self._block

    @abstractmethod
    def scores(self, x: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """One score per channel of the block (shape ``(block.num_channels,)``)."""

    def calibrate(self, gram: Tensor, tokens: int) -> None:
        """Adapt to the block's real inputs: ``gram`` is the sum of ``x x^T`` over ``tokens``
        context-token inputs seen in the dense warm-up. Default: nothing to adapt."""

    def state_dict(self) -> dict[str, Tensor]:
        """What ``calibrate`` learnt, for checkpoints; empty when nothing was learnt."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore ``state_dict()``; this estimator learns nothing, so only an empty state fits."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no calibration state, got keys {sorted(state)}.")

    @torch.no_grad()
    def select(self, x: Tensor, k: int, context_mask: Tensor | None = None) -> Tensor:
        """The ``k`` channels to keep for hidden states ``x`` (B, S, H), or pooled (B, H) for MLPs.

        ``context_mask`` (bool, B x S) marks the tokens that will run sparse; pass False for
        output tokens and padding, which must not steer the choice.
        """
        block = self.block
        return block.top_k(self.scores(x, context_mask).float(), k).to(x.device)


class _ActivationEstimator(ChannelEstimator):
    """Scores from (approximate) projections of the hidden states: the SparseLoRA rules."""

    @abstractmethod
    def _project(self, key: str, x: Tensor) -> Tensor:
        """``x @ W_key^T + b_key`` in fp32, exactly or approximately."""

    def _sq_norms(self, key: str, x: Tensor) -> Tensor:
        """Per-channel squared L2 norm of the projection over the rows of ``x``."""
        return self._project(key, x).square().sum(dim=0)

    def scores(self, x: Tensor, context_mask: Tensor | None = None) -> Tensor:
        block = self.block
        if isinstance(block, GatedMLPBlock):
            pooled = _pool(x, context_mask)
            return (block.act(self._project("gate", pooled)) * self._project("up", pooled)).norm(dim=0)
        if isinstance(block, MLPBlock):
            return block.act(self._project("fc1", _pool(x, context_mask))).norm(dim=0)
        tokens = _tokens(x, context_mask)
        if isinstance(block, QKBlock):
            return _qk_scores(self._sq_norms("q", tokens), self._sq_norms("k", tokens), block)
        return self._sq_norms("v", tokens).sqrt()


def _bias(block: Block, key: str, device: torch.device) -> Tensor | None:
    bias = block.weights()[key][1]
    return None if bias is None else bias.detach().float().to(device)


class SVDEstimator(_ActivationEstimator):
    """SparseLoRA's estimator: rank-``rank`` SVD factors of every scored weight, fp32.

    With ``cache`` (an ``SVDCache`` or a directory) the factors are built once and reused across
    runs; ``prepare`` then needs a unique layer ``name`` (it keys the files). With
    ``calibrated=True`` no factors come from the weights alone: ``calibrate`` builds
    activation-whitened ones (``whitened_factors``) from the inputs the block actually sees, which
    rank the channels far closer to the exact activations at the same rank (see
    ``docs/sparsity_estimators.md``); they live in checkpoints (``state_dict``), not in the cache.
    """

    def __init__(self, rank: int = 8, cache: SVDCache | str | Path | None = None, calibrated: bool = False) -> None:
        _check_rank(rank)
        if calibrated and cache is not None:
            raise ValueError(
                "calibrated SVD factors depend on the activations seen, so they are kept in checkpoints, not in"
                " the weight-keyed SVD cache: pass cache=None, or calibrated=False to cache weight-only factors."
            )
        self.rank = rank
        self.cache = SVDCache(cache) if isinstance(cache, (str, Path)) else cache
        self.calibrated = calibrated
        self._factors: dict[str, LowRankFactors] = {}

    def prepare(self, block: Block, name: str = "") -> None:
        super().prepare(block, name)
        if self.cache is not None and not name:
            raise ValueError("SVDEstimator with a cache needs prepare(block, name=<unique layer name>).")
        if self.calibrated:
            self._factors = {}  # built by calibrate()
            return
        self._factors = {
            key: self.cache.load_or_build(f"{name}.{key}", weight, self.rank)
            if self.cache is not None
            else svd_factors(weight, self.rank)
            for key, (weight, _) in block.weights().items()
        }

    def calibrate(self, gram: Tensor, tokens: int) -> None:
        self._factors = {
            key: whitened_factors(weight, gram, tokens, self.rank) for key, (weight, _) in self.block.weights().items()
        }
        self.calibrated = True

    def state_dict(self) -> dict[str, Tensor]:
        if not self.calibrated:
            return {}  # weight-only factors are rebuilt (or cached) from the weights
        return {f"{key}.{part}": getattr(f, part) for key, f in self._factors.items() for part in ("A", "B")}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if not state:
            return super().load_state_dict(state)
        weights = self.block.weights()
        expected = {f"{key}.{part}" for key in weights for part in ("A", "B")}
        if set(state) != expected:
            raise ValueError(f"SVDEstimator state has keys {sorted(state)}, expected {sorted(expected)}.")
        factors = {key: LowRankFactors(state[f"{key}.A"].float(), state[f"{key}.B"].float()) for key in weights}
        for key, (weight, _) in weights.items():
            f = factors[key]
            if f.A.shape != (weight.shape[1], f.rank) or f.B.shape != (f.rank, weight.shape[0]) or f.rank > self.rank:
                raise ValueError(
                    f"SVDEstimator state for {key!r} has factors {tuple(f.A.shape)} x {tuple(f.B.shape)}, which do not"
                    f" fit a {tuple(weight.shape)} weight at rank <= {self.rank}."
                )
        self._factors, self.calibrated = factors, True

    def _on(self, key: str, device: torch.device) -> LowRankFactors:
        if not self._factors:
            raise RuntimeError("This calibrated SVDEstimator has no factors yet: call calibrate(gram, tokens) first.")
        factors = self._factors[key]
        if factors.A.device != device:
            factors = self._factors[key] = factors.to(device)
        return factors

    def _project(self, key: str, x: Tensor) -> Tensor:
        out = self._on(key, x.device).project(x)
        bias = _bias(self.block, key, x.device)
        return out if bias is None else out + bias

    def _sq_norms(self, key: str, x: Tensor) -> Tensor:
        """Via the r x r Gram matrix of ``x @ A``: cost independent of the number of tokens past the
        first product, and the (tokens x out) approximate projection is never materialised."""
        factors = self._on(key, x.device)
        z = x @ factors.A
        sq = ((z.T @ z) @ factors.B * factors.B).sum(dim=0)
        bias = _bias(self.block, key, x.device)
        if bias is not None:
            sq = sq + 2 * bias * (z.sum(dim=0) @ factors.B) + x.shape[0] * bias.square()
        return sq.clamp_min(0)


class OracleEstimator(_ActivationEstimator):
    """Exact projections with the frozen weights, same scoring: the upper bound for analysis."""

    def _project(self, key: str, x: Tensor) -> Tensor:
        weight = self.block.weights()[key][0]
        out = x @ weight.detach().to(x.device, torch.float32).T
        bias = _bias(self.block, key, x.device)
        return out if bias is None else out + bias


class NormEstimator(ChannelEstimator):
    """Static, input-independent scores from the frozen weights' row norms (baseline)."""

    _static: Tensor

    def prepare(self, block: Block, name: str = "") -> None:
        super().prepare(block, name)
        rows = {key: weight.detach().float().square().sum(dim=1) for key, (weight, _) in block.weights().items()}
        if isinstance(block, GatedMLPBlock):
            self._static = (rows["gate"] * rows["up"]).sqrt()
        elif isinstance(block, QKBlock):
            self._static = _qk_scores(rows["q"], rows["k"], block)
        else:
            self._static = next(iter(rows.values())).sqrt()

    def scores(self, x: Tensor, context_mask: Tensor | None = None) -> Tensor:
        return self._static


class RandomEstimator(ChannelEstimator):
    """Uniformly random channels from a seeded generator: reproducible given the call sequence."""

    def __init__(self, seed: int = 0) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def scores(self, x: Tensor, context_mask: Tensor | None = None) -> Tensor:
        return torch.rand(self.block.num_channels, generator=self._generator)


class AllChannels(ChannelEstimator):
    """Every channel, whatever ``k``: the dense baseline through the same code path."""

    def scores(self, x: Tensor, context_mask: Tensor | None = None) -> Tensor:
        return torch.ones(self.block.num_channels)

    def select(self, x: Tensor, k: int, context_mask: Tensor | None = None) -> Tensor:
        return torch.arange(self.block.num_channels, device=x.device)


# -- registry ----------------------------------------------------------------------------------------

StrategyFactory = Callable[..., ChannelEstimator]
_STRATEGIES: dict[str, StrategyFactory] = {}


def register_strategy(name: str, factory: StrategyFactory, *, overwrite: bool = False) -> None:
    """Make ``factory(**options) -> ChannelEstimator`` available as strategy ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"A strategy name must be a non-empty string, got {name!r}.")
    if not callable(factory):
        raise ValueError(f"The factory of strategy {name!r} must be callable, got {factory!r}.")
    if name in _STRATEGIES and not overwrite:
        raise ValueError(f"Strategy {name!r} is already registered; pass overwrite=True to replace it.")
    _STRATEGIES[name] = factory


def available_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def get_strategy(name: str) -> StrategyFactory:
    """The factory registered as ``name``."""
    if name not in _STRATEGIES:
        raise ValueError(f"Unknown channel-selection strategy {name!r}; valid: {', '.join(available_strategies())}.")
    return _STRATEGIES[name]


def accepted_options(strategy: str, **offered: object) -> dict[str, object]:
    """The ``offered`` options the strategy's factory takes (all of them if it takes ``**kwargs``): how a
    caller hands every estimator the settings it understands without naming strategies."""
    parameters = inspect.signature(get_strategy(strategy)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(offered)
    return {key: value for key, value in offered.items() if key in parameters}


def build_estimator(strategy: str, block: Block, name: str = "", **options: object) -> ChannelEstimator:
    """``get_strategy(strategy)(**options)``, prepared on ``block`` (layer ``name``)."""
    estimator = get_strategy(strategy)(**options)
    estimator.prepare(block, name)
    return estimator


for _name, _factory in (
    ("svd", SVDEstimator),
    ("oracle", OracleEstimator),
    ("norm", NormEstimator),
    ("random", RandomEstimator),
    ("none", AllChannels),
):
    register_strategy(_name, _factory)
