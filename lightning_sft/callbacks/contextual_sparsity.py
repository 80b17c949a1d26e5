"""``ContextualSparsity``: SparseLoRA's per-batch channel selection wired into the Trainer."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_sft.anatomy import ModelAnatomy, describe
from lightning_sft.callbacks.base import SFTCallback
from lightning_sft.flops import report_skipped_flops
from lightning_sft.sparsity import (
    PRESETS,
    ChannelEstimator,
    SparseBlock,
    SparsityState,
    available_strategies,
    desparsify,
    kept_counts,
    resolve_layer_sparsity,
    sparsify,
)
from lightning_sft.sparsity.calibration import (
    SPARSITY_GRID,
    InputStatistics,
    allocate_sparsity,
    mlp_errors,
    relative_errors,
)
from lightning_sft.sparsity.context import context_mask_from_labels
from lightning_sft.sparsity.estimators import accepted_options
from lightning_sft.sparsity.schedule import dense_warmup_steps
from lightning_sft.strategies import WHOLE_WEIGHTS, WHOLE_WEIGHTS_REFUSAL

FLOPS_SOURCE = "contextual_sparsity"
AUTO = "auto"
SparsitySpec = float | Mapping[int | str, float] | str


class ContextualSparsity(SFTCallback):
    """Compute the frozen weights' context-token products on a per-batch subset of channels.

    Each training step an estimator picks, per layer, the MLP (and optionally attention) channels
    worth computing from the batch's context tokens; the sliced kernels skip the rest. Output
    tokens, the LoRA branch, the dense warm-up and every validation/test/predict pass stay dense.
    The last ``calibration_steps`` dense warm-up steps calibrate the estimator to the activations
    (and, with ``mlp_sparsity="auto"``, choose the per-layer sparsity) at no extra forward cost.

    Args:
        strategy: channel estimator (``svd``, ``oracle``, ``norm``, ``random``, ``none``, or one
            registered with ``lightning_sft.sparsity.register_strategy``).
        mlp_sparsity / attn_sparsity: fraction of channels skipped: a float in [0, 1), a
            ``{layer or "start-end": fraction}`` mapping, or a preset name (``PRESETS``);
            ``mlp_sparsity="auto"`` picks per-layer values from measured sensitivity.
        dense_layers: layer indices kept dense (negative count from the end); ignored for presets,
            which carry their own.
        dense_warmup: dense steps at the start: a fraction of the total in [0, 1) or a step count.
        sparse_output_tokens: also run the output tokens sparse (the reference's ablation; hurts quality).
        estimator_rank: rank of the SVD estimator.
        label_key: batch key of the labels (``-100`` marks context tokens).
        token_mask_fn: ``batch -> BoolTensor (B, S)``, True for tokens to run sparse; overrides labels.
        cache_dir: where weight-only SVD factors are cached between runs (keyed by weight
            fingerprint); needs ``calibration_steps=0``, since calibrated factors depend on the data.
        calibration_steps: dense warm-up steps (the last ones) whose activations calibrate the
            estimator (activation-whitened SVD factors) and ``"auto"``; 0 = weight-only factors as
            in the reference.
        flops_budget: with ``mlp_sparsity="auto"``, the fraction of the sparse-eligible MLPs'
            context-token FLOPs to keep (0.5 costs what a uniform 0.5 costs); default 0.5.

    Runs on one device and under DDP, FSDP2 and DeepSpeed: the sliced products run inside the blocks'
    forwards, where the weights are whole, and the estimators are built from weights gathered per block
    (refused under FSDP1, which cannot gather them there).
    """

    strategies = WHOLE_WEIGHTS
    strategy_refusal = WHOLE_WEIGHTS_REFUSAL.format(what="build the channel estimators")

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
        calibration_steps: int = 8,
        flops_budget: float | None = None,
    ) -> None:
        if strategy not in available_strategies():
            raise ValueError(f"Unknown strategy {strategy!r}; valid: {', '.join(available_strategies())}.")
        for name, spec in (("mlp_sparsity", mlp_sparsity), ("attn_sparsity", attn_sparsity)):
            if spec == AUTO and name == "mlp_sparsity":
                continue
            if isinstance(spec, str) and spec not in PRESETS:
                valid = sorted(PRESETS) + ([AUTO] if name == "mlp_sparsity" else [])
                raise ValueError(f"`{name}={spec!r}` is not a preset; valid: {', '.join(valid)}.")
            resolve_layer_sparsity(spec, 64)  # validates values and ranges before any model exists
        dense_warmup_steps(1000, dense_warmup)  # validates the warm-up spec
        if isinstance(estimator_rank, bool) or not isinstance(estimator_rank, int) or estimator_rank <= 0:
            raise ValueError(f"`estimator_rank` must be a positive integer, got {estimator_rank!r}; 8 is the default.")
        if token_mask_fn is not None and not callable(token_mask_fn):
            raise TypeError("`token_mask_fn` must be a callable batch -> BoolTensor (B, S), True = sparse token.")
        if isinstance(calibration_steps, bool) or not isinstance(calibration_steps, int) or calibration_steps < 0:
            raise ValueError(f"`calibration_steps` must be an integer >= 0, got {calibration_steps!r}; 8 is the default.")
        if cache_dir is not None and calibration_steps and "cache" in accepted_options(strategy, cache=cache_dir):
            raise ValueError(
                "`cache_dir` caches weight-only SVD factors, but calibration (calibration_steps > 0) replaces them"
                " with factors fitted to the activations: pass calibration_steps=0 to use the cache."
            )
        if mlp_sparsity == AUTO:
            if not calibration_steps:
                raise ValueError("mlp_sparsity='auto' measures sensitivity while calibrating: set calibration_steps >= 1.")
            flops_budget = 0.5 if flops_budget is None else flops_budget
            if isinstance(flops_budget, bool) or not isinstance(flops_budget, (int, float)):
                raise ValueError(f"`flops_budget` must be a number in [0.01, 1], got {flops_budget!r}.")
            if not 0.01 <= flops_budget <= 1:
                raise ValueError(
                    f"`flops_budget` must be in [0.01, 1] (fraction of the MLP context FLOPs kept; 0.01 = 0.99 sparsity"
                    f" everywhere), got {flops_budget!r}."
                )
        elif flops_budget is not None:
            raise ValueError("`flops_budget` applies to mlp_sparsity='auto' only; pass mlp_sparsity='auto' or drop it.")
        self.strategy = strategy
        self.mlp_sparsity = mlp_sparsity
        self.attn_sparsity = attn_sparsity
        self.dense_layers = tuple(dense_layers)
        self.dense_warmup = dense_warmup
        self.estimator_rank = estimator_rank
        self.label_key = label_key
        self.token_mask_fn = token_mask_fn
        self.cache_dir = cache_dir
        self.calibration_steps = calibration_steps
        self.flops_budget = flops_budget
        self.state = SparsityState(sparse_output_tokens=sparse_output_tokens)
        self.blocks: list[SparseBlock] = []
        self.auto_sparsity: dict[str, float] = {}  # the "auto" choice per MLP, once calibrated
        self._warmup_steps = 0
        self._calibrating = False
        self._loaded: dict[str, Any] = {}
        self._residual_hooks: list[RemovableHandle] = []
        self._estimator_map: dict[str, tuple[str, ChannelEstimator]] = {}

    def run_label(self) -> str:
        return f"sparsity {self.strategy} {self.mlp_sparsity:g}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.begin_setup(trainer, pl_module, stage)
        if stage == "fit":
            self._plan(pl_module)  # refuse a model it cannot handle now, before any training

    def _plan(self, pl_module: pl.LightningModule) -> tuple[ModelAnatomy, list[float], list[float]]:
        anatomy = describe(pl_module)
        spec = 1.0 - self.flops_budget if self.mlp_sparsity == AUTO else self.mlp_sparsity  # "auto" starts uniform
        if anatomy.moe and spec != 0:
            raise ValueError(
                f"{anatomy.moe[0]} is a mixture-of-experts block: each expert already runs only on the tokens routed"
                " to it, and its experts are stored as one batched weight that the sliced products do not describe."
                " Pass mlp_sparsity=0 (dense experts) and attn_sparsity > 0 to make the attention sparse."
            )
        dense = () if isinstance(spec, str) else self.dense_layers
        mlp = resolve_layer_sparsity(spec, len(anatomy.mlps), dense_layers=dense) if anatomy.mlps else []
        attn: list[float] = []
        if anatomy.attentions:
            dense = () if isinstance(self.attn_sparsity, str) else self.dense_layers
            attn = resolve_layer_sparsity(self.attn_sparsity, len(anatomy.attentions), part="attn", dense_layers=dense)
        elif self.attn_sparsity not in (0, 0.0):
            raise TypeError(f"attn_sparsity > 0, but {type(pl_module).__name__} has no recognisable attention block.")
        if self.mlp_sparsity == AUTO and not any(mlp):
            raise ValueError("mlp_sparsity='auto' found no MLP outside dense_layers to make sparse.")
        if not any(mlp) and not any(attn):
            rank_zero_warn("ContextualSparsity: every layer has sparsity 0, so training stays dense.")
        return anatomy, mlp, attn

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every callback's setup (so LoRA has frozen the base, whatever the callback order);
        # making blocks sparse adds no parameters, so the optimizer built since then is unaffected.
        anatomy, mlp, attn = self._plan(pl_module)
        self._warmup_steps = dense_warmup_steps(int(trainer.estimated_stepping_batches), self.dense_warmup)
        if self.mlp_sparsity == AUTO and self._warmup_steps == 0:
            raise ValueError(
                "mlp_sparsity='auto' calibrates during the dense warm-up, which is 0 steps here: set dense_warmup"
                f" to at least calibration_steps={self.calibration_steps} steps (an int) or a larger fraction."
            )
        calibrate = self.calibration_steps > 0 and self._warmup_steps > 0
        if self.calibration_steps and not self._warmup_steps:
            rank_zero_warn("ContextualSparsity: no dense warm-up step to calibrate from; the estimator uses the weights only.")
        cache = Path(self.cache_dir) if self.cache_dir else None
        options = accepted_options(self.strategy, rank=self.estimator_rank, cache=cache, calibrated=calibrate)
        blocks = anatomy.mlps + anatomy.attentions
        self.blocks = sparsify(pl_module, blocks, mlp + attn, self.state, self.strategy, **options)
        self._estimator_map = self._estimators()
        learns = any(type(e).calibrate is not ChannelEstimator.calibrate for _, e in self._estimator_map.values())
        self._calibrating = calibrate and (learns or self.mlp_sparsity == AUTO)
        if self._calibrating and self.mlp_sparsity == AUTO:
            self._track_residuals(pl_module)
        if self._loaded:
            self._restore(pl_module)
        calibrating = min(self.calibration_steps, self._warmup_steps) if self._calibrating else 0
        rank_zero_info(
            f"ContextualSparsity: {self.strategy} on {len(self.blocks)} blocks; dense for the first"
            f" {self._warmup_steps} steps" + (f", calibrating on the last {calibrating}." if calibrating else ".")
        )

    # -- the sparse blocks ---------------------------------------------------------------------------

    def _mlp_blocks(self) -> dict[str, SparseBlock]:
        return {block.name: block for block in self.blocks if block.anatomy.kind == "mlp"}

    def _estimators(self) -> dict[str, tuple[str, ChannelEstimator]]:
        """Every estimator by a stable key (the MLP name, or ``<attention>.qk`` / ``<attention>.v``),
        with the name of the block whose inputs it scores."""
        estimators: dict[str, tuple[str, ChannelEstimator]] = {}
        for block in self.blocks:
            for group, estimator in block.estimators.items():
                estimators[block.anatomy.key(group)] = (block.name, estimator)
        return estimators

    def _set_mlp_sparsity(self, sparsity: dict[str, float]) -> None:
        """Apply an "auto" choice: new kept counts; a layer chosen dense gets its own forward back."""
        blocks = self._mlp_blocks()
        if set(sparsity) != set(blocks):
            raise ValueError(f"The 'auto' sparsity covers {sorted(sparsity)}, but the sparse MLPs are {sorted(blocks)}.")
        for name, value in sparsity.items():
            if value == 0.0:
                blocks[name].remove()
                self.blocks.remove(blocks[name])
            else:
                blocks[name].keep = kept_counts(blocks[name].anatomy, value)
        self.auto_sparsity = dict(sparsity)
        self._estimator_map = self._estimators()

    # -- calibration ---------------------------------------------------------------------------------

    def _track_residuals(self, pl_module: nn.Module) -> None:
        """For "auto": the residual stream after each MLP's layer (its parent's output) sets the scale
        its error is judged against."""
        for name, block in self._mlp_blocks().items():
            # The layer around an MLP module; an MLP spread over its layer (OPT, BERT) is the layer itself.
            parent = pl_module.get_submodule(name.rpartition(".")[0] if block.region is not None else name)

            def hook(module: nn.Module, args: Any, output: Any, name: str = name) -> None:
                out = output[0] if isinstance(output, (tuple, list)) else output
                mask = self.state.context_mask
                if not self.state.observing or mask is None:
                    return
                if not isinstance(out, torch.Tensor) or tuple(out.shape[:2]) != tuple(mask.shape):
                    raise TypeError(
                        f"mlp_sparsity='auto' reads the residual stream from the output of {name}'s parent layer, which"
                        f" returned {type(out).__name__}; use a float or mapping mlp_sparsity for this model."
                    )
                self.state.statistics.setdefault(name, InputStatistics()).update_residual(out, mask.to(out.device))

            self._residual_hooks.append(parent.register_forward_hook(hook))

    def _remove_residual_hooks(self) -> None:
        for handle in self._residual_hooks:
            handle.remove()
        self._residual_hooks = []

    def _finish_calibration(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reduce the statistics over ranks, fit the estimators, and (for "auto") choose the sparsity."""
        self._remove_residual_hooks()
        statistics = self.state.statistics
        missing = sorted({source for source, _ in self._estimator_map.values()} - set(statistics))
        if missing:
            raise RuntimeError(f"ContextualSparsity saw no context token at {missing} while calibrating.")

        def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.reduce(tensor, reduce_op="sum")

        for stats in statistics.values():
            stats.reduce(reduce_sum)
        for source, estimator in self._estimator_map.values():
            estimator.calibrate(statistics[source].gram, statistics[source].tokens)
        if self.mlp_sparsity == AUTO:
            blocks = self._mlp_blocks()
            errors = torch.stack([
                relative_errors(
                    reduce_sum(mlp_errors(block, statistics[name]).to(statistics[name].gram.device)).cpu(),
                    statistics[name].residual_sq, statistics[name].residual_tokens,
                )
                for name, block in blocks.items()
            ])
            choice = dict(zip(blocks, allocate_sparsity(errors, self.flops_budget)))
            self._set_mlp_sparsity(choice)
            rank_zero_info(self._auto_report(errors, choice))
        self.state.statistics, self.state.observing, self._calibrating = {}, False, False

    def _auto_report(self, errors: torch.Tensor, choice: dict[str, float]) -> str:
        header = f"ContextualSparsity auto (budget {self.flops_budget:.2f} of the MLP FLOPs): relative error per sparsity"
        grid = " ".join(f"{s:>8}" for s in SPARSITY_GRID)
        rows = [
            f"{name:<40} {' '.join(f'{e:8.1e}' for e in row.tolist())}  -> {choice[name]}"
            for name, row in zip(choice, errors)
        ]
        return "\n".join([header, f"{'layer':<40} {grid}", *rows])

    def _restore(self, pl_module: nn.Module) -> None:
        """Apply a checkpoint's calibration (estimators, "auto" choice) or its unfinished statistics."""
        loaded, self._loaded = self._loaded, {}
        if "estimators" in loaded:
            if loaded.get("auto_sparsity"):
                self._set_mlp_sparsity(loaded["auto_sparsity"])
            if set(loaded["estimators"]) != set(self._estimator_map):
                raise ValueError(
                    f"The checkpoint's ContextualSparsity state covers {sorted(loaded['estimators'])}, but this model's"
                    f" sparse modules are {sorted(self._estimator_map)}: resume with the same model and settings."
                )
            for key, (_, estimator) in self._estimator_map.items():
                estimator.load_state_dict(loaded["estimators"][key])
            self._calibrating = False
            self._remove_residual_hooks()
        for name, stats in loaded.get("statistics", {}).items():
            self.state.statistics[name] = InputStatistics()
            self.state.statistics[name].load_state_dict(stats)

    def state_dict(self) -> dict[str, Any]:
        if self._calibrating:
            return {"statistics": {name: stats.state_dict() for name, stats in self.state.statistics.items()}}
        if not self.blocks:
            return {}
        estimators = {key: estimator.state_dict() for key, (_, estimator) in self._estimator_map.items()}
        return {"estimators": estimators, "auto_sparsity": dict(self.auto_sparsity)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)

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
        state, step = self.state, trainer.global_step
        state.reset()
        if self._calibrating and step >= self._warmup_steps and state.statistics:
            self._finish_calibration(trainer, pl_module)  # resumed from a checkpoint taken mid-calibration
        state.observing = self._calibrating and step >= self._warmup_steps - self.calibration_steps
        state.active = bool(self.blocks) and step >= self._warmup_steps and not self._calibrating
        state.context_mask = self._context_mask(batch) if state.active or state.observing else None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        # The forward has run: its skips (forward and the coming input-gradient products) are known,
        # and EfficiencyMonitor reads the ledger only after backward, whatever the callback order.
        if self.state.skipped_flops:
            report_skipped_flops(pl_module, FLOPS_SOURCE, self.state.skipped_flops)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        state = self.state
        achieved, observed = state.layer_sparsity, state.observing
        estimator_time = state.estimator_seconds() if state.active else None
        state.active, state.observing, state.context_mask = False, False, None  # validation and the rest: dense
        if observed and trainer.global_step >= self._warmup_steps:
            self._finish_calibration(trainer, pl_module)
        if not self.blocks:
            return
        metrics = {f"sparsity/{name}": value for name, value in achieved.items()}
        metrics["sparsity/mean"] = sum(achieved.values()) / len(achieved) if achieved else 0.0
        if estimator_time is not None:
            metrics["sparsity/estimator_time"] = estimator_time
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_residual_hooks()
        if stage == "fit" and self.blocks:
            desparsify(pl_module)
            self.blocks = []
