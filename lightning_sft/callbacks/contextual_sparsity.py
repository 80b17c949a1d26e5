"""``ContextualSparsity``: SparseLoRA's per-batch channel selection wired into the Trainer."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_sft.flops import report_skipped_flops
from lightning_sft.sparsity import (
    PRESETS,
    SparsityState,
    available_strategies,
    resolve_layer_sparsity,
    unwrap_all,
    unwrap_attention,
    wrap_attention,
    wrap_gated_mlps,
    wrap_plain_mlps,
)
from lightning_sft.sparsity.discovery import find_targets
from lightning_sft.sparsity.schedule import dense_warmup_steps
from lightning_sft.tasks.exact_match import IGNORE_INDEX

FLOPS_SOURCE = "contextual_sparsity"
SparsitySpec = float | Mapping[int | str, float] | str


def context_mask_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """True where a position's prediction is not scored: those tokens run sparse.

    HF causal LMs predict token t+1 at position t, so position t is an *output* position when
    ``labels[t + 1]`` is scored. This keeps the last prompt token (which predicts the first answer
    token) dense, and lets the final position (whose prediction is never scored) go sparse.
    """
    scored_next = torch.zeros_like(labels, dtype=torch.bool)
    scored_next[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return ~scored_next


class ContextualSparsity(Callback):
    """Compute the frozen weights' context-token products on a per-batch subset of channels.

    Each training step an estimator picks, per layer, the MLP (and optionally attention) channels
    worth computing from the batch's context tokens; the sliced kernels skip the rest. Output
    tokens, the LoRA branch, the dense warm-up and every validation/test/predict pass stay dense.

    Args:
        strategy: channel estimator (``svd``, ``oracle``, ``norm``, ``random``, ``none``, or one
            registered with ``lightning_sft.sparsity.register_strategy``).
        mlp_sparsity / attn_sparsity: fraction of channels skipped: a float in [0, 1), a
            ``{layer or "start-end": fraction}`` mapping, or a preset name (``PRESETS``).
        dense_layers: layer indices kept dense (negative count from the end); ignored for presets,
            which carry their own.
        dense_warmup: dense steps at the start: a fraction of the total in [0, 1) or a step count.
        sparse_output_tokens: also run the output tokens sparse (the reference's ablation; hurts quality).
        estimator_rank: rank of the SVD estimator.
        label_key: batch key of the labels (``-100`` marks context tokens).
        token_mask_fn: ``batch -> BoolTensor (B, S)``, True for tokens to run sparse; overrides labels.
        cache_dir: where SVD factors are cached between runs (keyed by weight fingerprint).
    """

    def __init__(
        self,
        strategy: str = "svd",
        mlp_sparsity: SparsitySpec = 0.5,
        attn_sparsity: SparsitySpec = 0.0,
        dense_layers: Sequence[int] = (0, -1),
        dense_warmup: float | int = 0.05,
        sparse_output_tokens: bool = False,
        estimator_rank: int = 8,
        label_key: str = "labels",
        token_mask_fn: Callable[[Any], torch.Tensor] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if strategy not in available_strategies():
            raise ValueError(f"Unknown strategy {strategy!r}; valid: {', '.join(available_strategies())}.")
        for name, spec in (("mlp_sparsity", mlp_sparsity), ("attn_sparsity", attn_sparsity)):
            if isinstance(spec, str) and spec not in PRESETS:
                raise ValueError(f"`{name}={spec!r}` is not a preset; valid: {', '.join(sorted(PRESETS))}.")
            resolve_layer_sparsity(spec, 64)  # validates values and ranges before any model exists
        dense_warmup_steps(1000, dense_warmup)  # validates the warm-up spec
        if isinstance(estimator_rank, bool) or not isinstance(estimator_rank, int) or estimator_rank <= 0:
            raise ValueError(f"`estimator_rank` must be a positive integer, got {estimator_rank!r}; 8 is the default.")
        if token_mask_fn is not None and not callable(token_mask_fn):
            raise TypeError("`token_mask_fn` must be a callable batch -> BoolTensor (B, S), True = sparse token.")
        self.strategy = strategy
        self.mlp_sparsity = mlp_sparsity
        self.attn_sparsity = attn_sparsity
        self.dense_layers = tuple(dense_layers)
        self.dense_warmup = dense_warmup
        self.estimator_rank = estimator_rank
        self.label_key = label_key
        self.token_mask_fn = token_mask_fn
        self.cache_dir = cache_dir
        self.state = SparsityState(sparse_output_tokens=sparse_output_tokens)
        self.wrapped: list[str] = []
        self._warmup_steps = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if sum(isinstance(cb, ContextualSparsity) for cb in trainer.callbacks) > 1:
            raise ValueError("ContextualSparsity was added more than once; keep exactly one in `callbacks`.")
        if stage == "fit":
            self._plan(pl_module)  # refuse a model it cannot handle now, before any training

    def _plan(self, pl_module: pl.LightningModule) -> tuple[Any, list[float], list[float]]:
        targets = find_targets(pl_module)
        dense = () if isinstance(self.mlp_sparsity, str) else self.dense_layers
        mlp = resolve_layer_sparsity(self.mlp_sparsity, len(targets.mlps), dense_layers=dense) if targets.mlps else []
        attn: list[float] = []
        if targets.attentions:
            dense = () if isinstance(self.attn_sparsity, str) else self.dense_layers
            attn = resolve_layer_sparsity(self.attn_sparsity, len(targets.attentions), part="attn", dense_layers=dense)
        if any(attn) and not targets.attentions:
            raise TypeError("attn_sparsity > 0 needs attention modules with separate q/k/v/o projections.")
        if not any(mlp) and not any(attn):
            rank_zero_warn("ContextualSparsity: every layer has sparsity 0, so training stays dense.")
        return targets, mlp, attn

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every callback's setup (so LoRA has frozen the base, whatever the callback order);
        # wrapping adds no parameters, so the optimizer built since then is unaffected.
        targets, mlp, attn = self._plan(pl_module)
        options: dict[str, Any] = {}
        if self.strategy == "svd":
            options = {"rank": self.estimator_rank, "cache": Path(self.cache_dir) if self.cache_dir else None}
        wrap_mlps = wrap_gated_mlps if targets.mlp_kind == "gated" else wrap_plain_mlps
        self.wrapped = wrap_mlps(pl_module, self.state, self.strategy, mlp, targets.mlps, **options) if any(mlp) else []
        if any(attn):
            self.wrapped += wrap_attention(pl_module, self.state, self.strategy, attn, targets.attentions, **options)
        self._warmup_steps = dense_warmup_steps(int(trainer.estimated_stepping_batches), self.dense_warmup)
        rank_zero_info(
            f"ContextualSparsity: {self.strategy} on {len(self.wrapped)} modules; dense for the first"
            f" {self._warmup_steps} steps."
        )

    def _context_mask(self, batch: Any) -> torch.Tensor:
        if self.token_mask_fn is not None:
            mask = self.token_mask_fn(batch)
        elif isinstance(batch, Mapping) and self.label_key in batch:
            mask = context_mask_from_labels(batch[self.label_key])
            if isinstance(batch.get("attention_mask"), torch.Tensor):
                # Padding is neither context nor output: keep it out of the estimator's pooled statistics.
                mask = mask & batch["attention_mask"].bool()
        else:
            raise ValueError(
                f"ContextualSparsity found no {self.label_key!r} in the batch, so it cannot tell context from"
                " output tokens. Pass label_key=<your labels key> or token_mask_fn=batch -> BoolTensor (B, S)."
            )
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError(f"The token mask must be a bool tensor (batch, seq); got {getattr(mask, 'shape', mask)!r}.")
        return mask

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.state.reset()
        self.state.active = bool(self.wrapped) and trainer.global_step >= self._warmup_steps
        self.state.context_mask = self._context_mask(batch) if self.state.active else None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # The forward has run: its skips (forward and the coming input-gradient products) are known,
        # and EfficiencyMonitor reads the ledger only after backward, whatever the callback order.
        if self.state.skipped_flops:
            report_skipped_flops(pl_module, FLOPS_SOURCE, self.state.skipped_flops)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        achieved = self.state.layer_sparsity
        self.state.active, self.state.context_mask = False, None  # validation and anything else: dense
        if not self.wrapped:
            return
        metrics = {f"sparsity/{name}": value for name, value in achieved.items()}
        metrics["sparsity/mean"] = sum(achieved.values()) / len(achieved) if achieved else 0.0
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.wrapped:
            unwrap_all(pl_module)
            unwrap_attention(pl_module)
            self.wrapped = []
