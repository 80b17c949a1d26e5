"""The SparseFineTuning callback: train a small chosen subset of the base weights' entries.

The pure logic lives in :mod:`lightning_sft.sparse_ft` (the sparse-delta layer, entry selection,
diff files); this file wires it to the Trainer. See ``docs/sparse_finetuning.md``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info

from lightning_sft.adapters.injection import lora_layers
from lightning_sft.adapters.targeting import ALL_LINEAR, validate_target_spec
from lightning_sft.callbacks.base import SFTCallback
from lightning_sft.callbacks.side_loop import (
    batch_count,
    fit_dataloader,
    outside_the_fit,
    step_loss,
    take_batches,
    usable_batches,
)
from lightning_sft.rng import capture_rng, restore_rng
from lightning_sft.sharding import full_tensor, unsharded, write_full
from lightning_sft.sparse_ft.delta_layer import SparseDeltaLinear, sparse_delta_layers
from lightning_sft.sparse_ft.injection import inject_sparse_deltas
from lightning_sft.sparse_ft.selection import (
    GRADIENT_SELECTIONS,
    accumulate,
    drop_and_regrow,
    random_importance,
    ranking,
    top_entries,
    validate_density,
    validate_fraction,
    validate_selection,
)
from lightning_sft.strategies import WHOLE_WEIGHTS, WHOLE_WEIGHTS_REFUSAL
from lightning_sft.validation import check_int

_WHO = "SparseFineTuning"
DEFAULT_SCORE_BATCHES = 8
# Mixes the seed and the reselection count into one generator seed (a large odd multiplier).
_SEED_STRIDE = 0x9E3779B97F4A7C15


class SparseFineTuning(SFTCallback):
    """Fine-tune only ``density`` of the entries of each targeted weight, chosen before training.

    Each targeted layer gets a ``SparseDeltaLinear`` wrapper holding (indices, values): only the
    values train, so gradients and optimizer states scale with the density, not the model. Save the
    result with ``save_diff`` and apply it to the base with ``apply_diff``.

    Args:
        density: fraction of each targeted weight's entries to train, in (0, 1].
        selection: how entries are chosen: ``fisher`` (sum of squared gradients), ``grad`` (magnitude
            of the summed gradient), ``weight`` (largest frozen weights) or ``random``.
        target_modules: ``"all-linear"`` (every linear layer except output heads), module-name
            suffixes, or a regex, as for ``LoRA``.
        exclude_modules: the same forms, removed from the selection.
        reselect_every: every this many optimizer steps, drop the ``regrow_fraction`` of trained
            entries whose deltas moved least and regrow as many new ones by the same score (SpIEL);
            ``None`` keeps the first choice.
        regrow_fraction: the fraction of entries swapped at each reselection, in (0, 1).
        score_batches: training batches whose gradients score the entries: before the fit for
            ``fisher``/``grad``, and the last steps before each reselection. None: 8 (at most
            ``reselect_every``), or the training batches within ``limit_train_batches`` if fewer.
        seed: seed of the ``random`` selection; default: the global seed of rank 0.

    Runs on one device and under DDP, FSDP2 and DeepSpeed: the sparse-delta layers exist before the
    strategy shards the module; selections and reselections read whole weights, gathered per layer
    (refused under FSDP1, which cannot gather them there; docs/distributed.md).
    """

    excludes = MappingProxyType({
        "LoRA": "sparse fine-tuning trains entries of the base weights and LoRA trains adapters beside them; use one"
                " of the two. Remove the LoRA callback (`--no_lora` on the command line).",
        "ContextualSparsity": "contextual sparsity slices the frozen base weights and would skip the sparse deltas."
                              " Use ContextualSparsity with LoRA.",
    })
    strategies = WHOLE_WEIGHTS
    strategy_refusal = WHOLE_WEIGHTS_REFUSAL.format(what="choose and regrow the trained entries")

    def __init__(
        self,
        density: float = 0.01,
        selection: str = "fisher",
        target_modules: str | Sequence[str] = ALL_LINEAR,
        exclude_modules: str | Sequence[str] | None = None,
        reselect_every: int | None = None,
        regrow_fraction: float = 0.2,
        score_batches: int | None = None,
        seed: int | None = None,
    ) -> None:
        validate_density(density)
        validate_selection(selection)
        validate_target_spec(target_modules, "target_modules")
        validate_target_spec(exclude_modules, "exclude_modules")
        if score_batches is not None:
            check_int(score_batches, "score_batches", 1, "8 batches usually rank entries well; None uses up to 8.")
        if reselect_every is not None:
            check_int(reselect_every, "reselect_every", 1, "Use None to keep the first selection.")
            if selection == "weight":
                raise ValueError(
                    "selection='weight' with reselect_every: the frozen weights never change, so a reselection"
                    " has nothing new to rank by. Use selection='fisher' or 'grad', or reselect_every=None."
                )
            if score_batches is not None and score_batches > reselect_every:
                raise ValueError(
                    f"`score_batches={score_batches}` must be <= `reselect_every={reselect_every}`: the scores of a"
                    " reselection come from the steps since the previous one."
                )
        validate_fraction(regrow_fraction, "regrow_fraction", "SpIEL swaps about 0.2 of the entries each time.")
        if seed is not None:
            check_int(seed, "seed", 0, "Use None for the global seed.")
        self.density = density
        self.selection = selection
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.exclude_modules = exclude_modules if exclude_modules is None or isinstance(exclude_modules, str) \
            else list(exclude_modules)
        self.reselect_every = reselect_every
        self.regrow_fraction = regrow_fraction
        self.score_batches = score_batches
        # The scoring window: as given, or the default within reselect_every (the data may cut it at fit start).
        self._score_window = (
            score_batches if score_batches is not None else min(DEFAULT_SCORE_BATCHES, reselect_every or DEFAULT_SCORE_BATCHES)
        )
        self.seed = seed
        self.tuned_modules: list[str] = []
        self._selected = False
        self._reselections = 0
        self._last_reselect_step = 0
        self._scores: dict[str, torch.Tensor] = {}
        self._seed: int | None = seed

    # -- set-up -------------------------------------------------------------------------------------

    def run_label(self) -> str:
        return f"sparse FT {self.density:.3g}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.begin_setup(trainer, pl_module, stage)
        if lora_layers(pl_module):
            raise ValueError(f"{_WHO}: the module holds LoRA adapters; {self.excludes['LoRA']}")
        existing = sparse_delta_layers(pl_module)
        if existing:  # a second fit with the same module: keep its deltas (and their selection)
            self.tuned_modules = list(existing)
            self._selected = self._selected or all(layer.selected for layer in existing.values())
            return
        self.tuned_modules = inject_sparse_deltas(
            pl_module, self.density, self.selection, self.target_modules, self.exclude_modules
        )
        layers = sparse_delta_layers(pl_module)
        trainable = sum(layer.count for layer in layers.values())
        targeted = sum(layer.base_layer.weight.numel() for layer in layers.values())
        rank_zero_info(
            f"{_WHO}: {len(layers)} layers, {trainable:,} trainable entries of {targeted:,}"
            f" ({100 * trainable / targeted:.2f}%), selection {self.selection!r}."
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._seed is None:
            self._seed = int(trainer.strategy.broadcast(torch.initial_seed()))
        if self._selected:  # resumed, or a second fit: the entries are already chosen
            return
        layers = sparse_delta_layers(pl_module)
        if self.selection in GRADIENT_SELECTIONS:
            self._score_before_fit(trainer, pl_module, layers)
        for name, layer in layers.items():
            with unsharded(layer, writeback=True), torch.no_grad():  # a sharded base: whole weights to rank
                layer.delta_indices.copy_(top_entries(self._importance(name, layer), layer.count))
                layer.delta_values.zero_()
            layer.selected = True
        self._selected = True

    def _score_before_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layers: dict[str, Any]) -> None:
        """Accumulate ``score_batches`` training batches' dense weight gradients, leaving no trace
        in the fit: the global RNG, module modes and gradients are as they were."""
        why = f"selection={self.selection!r} scores entries by gradients of training batches"
        loader = fit_dataloader(trainer, trainer.fit_loop._data_source, RunningStage.TRAINING, _WHO, why)
        rng = capture_rng()
        self._observe(layers)
        try:
            with outside_the_fit(pl_module):
                available = usable_batches(trainer, loader, RunningStage.TRAINING)
                count = batch_count("score_batches", self.score_batches, self._score_window, available, _WHO, "training")
                for index, batch in take_batches(loader, count, "training", _WHO, "`score_batches`"):
                    step_loss(trainer, pl_module, batch, index, trainer.precision_plugin.forward_context, _WHO).backward()
        finally:
            self._observe(layers, on=False)
            restore_rng(rng)
            for layer in layers.values():
                layer.delta_values.grad = None
        self._reduce_scores(trainer)

    # -- reselection --------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.reselect_every is None:
            return
        step = trainer.global_step + 1  # the optimizer step this batch contributes to
        scoring = (step - 1) % self.reselect_every >= self.reselect_every - self._score_window
        self._observe(sparse_delta_layers(pl_module), on=scoring and self.selection in GRADIENT_SELECTIONS)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.reselect_every is None or step == 0 or step % self.reselect_every or step == self._last_reselect_step:
            return
        layers = sparse_delta_layers(pl_module)
        self._observe(layers, on=False)
        self._reduce_scores(trainer)
        self._reselections += 1
        swapped = 0
        for name, layer in layers.items():
            values = layer.delta_values  # the optimizer's parameter, sharded or not
            with unsharded(layer, writeback=True):
                importance = self._importance(name, layer)
                positions, new = drop_and_regrow(layer.delta_indices, layer.delta_values, importance, self.regrow_fraction)
                with torch.no_grad():
                    layer.delta_indices[positions] = new.to(layer.delta_indices.device)
                    layer.delta_values[positions] = 0
            _reset_optimizer_state(trainer, values, positions)
            swapped += positions.numel()
        self._scores.clear()
        self._last_reselect_step = step
        pl_module.log("sparse_ft/regrown", float(swapped), on_step=True, on_epoch=False)

    def _importance(self, name: str, layer: SparseDeltaLinear) -> torch.Tensor:
        """What ranks the layer's entries now; a gradient score is used up by the choice it makes."""
        if self.selection == "weight":
            return layer.base_layer.weight.detach().abs()
        if self.selection == "random":
            return random_importance(layer.base_layer.weight.numel(), self._generator(name))
        return ranking(self._scores.pop(name), self.selection)

    def _observe(self, layers: dict[str, SparseDeltaLinear], on: bool = True) -> None:
        for name, layer in layers.items():
            layer.gradient_observer = self._accumulator(name) if on else None

    def _accumulator(self, name: str) -> Any:
        def observe(layer: SparseDeltaLinear, gradient: torch.Tensor) -> None:
            if name not in self._scores:
                self._scores[name] = torch.zeros(gradient.shape, dtype=torch.float32, device=gradient.device)
            accumulate(self._scores[name], gradient, self.selection)

        return observe

    def _reduce_scores(self, trainer: pl.Trainer) -> None:
        """Sum the scores over processes, so every process makes the same choice."""
        for name in sorted(self._scores):
            self._scores[name] = trainer.strategy.reduce(self._scores[name], reduce_op="sum")

    def _generator(self, name: str) -> torch.Generator:
        assert self._seed is not None
        mixed = (self._seed + _SEED_STRIDE * (self._reselections + 1) + zlib.crc32(name.encode())) % 2**63
        return torch.Generator().manual_seed(mixed)

    # -- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "selected": self._selected,
            "seed": self._seed,
            "reselections": self._reselections,
            "last_reselect_step": self._last_reselect_step,
            "scores": {name: score.cpu() for name, score in self._scores.items()},
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        for layer in sparse_delta_layers(pl_module).values():
            layer.selected = True  # the checkpoint's indices are a selection

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._selected = bool(state_dict["selected"])
        self._seed = state_dict["seed"]
        self._reselections = int(state_dict["reselections"])
        self._last_reselect_step = int(state_dict["last_reselect_step"])
        self._scores = dict(state_dict["scores"])


def _reset_optimizer_state(trainer: pl.Trainer, values: torch.Tensor, positions: torch.Tensor) -> None:
    """Regrown entries start fresh: zero their slots in every optimizer state shaped like the values."""
    for optimizer in trainer.optimizers:
        for state in optimizer.state.get(values, {}).values():
            if isinstance(state, torch.Tensor) and state.shape == values.shape:
                whole = full_tensor(state).clone()
                whole[positions.to(whole.device)] = 0
                write_full(state, whole)
