"""The AdaptiveRankSearch callback: short trials at candidate LoRA ranks at fit start, then the fit at the best.

The trials are a small training loop of their own, not Lightning's: none of the Trainer's loops,
counters, loggers or optimizers take part, so nothing of theirs needs restoring. What the trials do
touch (the adapters, other trainable weights and buffers, the global RNG, module modes, ``self.log``)
is put back, and the adapters at the chosen rank are drawn as a fit at that rank would draw them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_warn

from lightning_sft.adapters.injection import lora_layers
from lightning_sft.callbacks.base import SFTCallback
from lightning_sft.callbacks.side_loop import (
    batch_count,
    check_batches,
    fit_dataloader,
    mean_gradients,
    outside_the_fit,
    restore_modes,
    step_loss,
    take_batches,
    usable_batches,
)
from lightning_sft.rank_search import (
    DEFAULT_CANDIDATES,
    Trial,
    adapter_params,
    allocate_ranks,
    best,
    fitted_trial_steps,
    format_table,
    halving_schedule,
    score,
    search_steps,
    validate_candidates,
    validate_penalty,
)
from lightning_sft.rank_search.trial_state import add_importance, build_adapters, restore, touched_state

if TYPE_CHECKING:  # annotations only: the instance comes from `requires`
    from lightning_sft.callbacks.lora import LoRA
from lightning_sft.rng import capture_rng, restore_rng
from lightning_sft.strategies import UNSHARDED
from lightning_sft.validation import check_int

_WHO = "AdaptiveRankSearch"
_FIX = "trial_steps / rounds / val_batches"
_TRIAL_STEPS_FLAG = " (CLI: --trainer.callbacks+=AdaptiveRankSearch --trainer.callbacks.trial_steps N)"
DEFAULT_TRIAL_STEPS = 50
DEFAULT_VAL_BATCHES = 8


class AdaptiveRankSearch(SFTCallback):
    """Choose the LoRA rank at the start of fit with a short trial per candidate (needs ``LoRA``).

    Each trial builds fresh adapters at one rank, trains them ``trial_steps`` optimizer steps with a
    fresh optimizer from ``configure_optimizers`` on the same batches and random draws as every other
    trial, and scores them ``val_loss + penalty * p(r)``, ``p(r)`` the adapter parameters relative to
    the largest candidate. The best rank's adapters are then built as a fit at that rank would build
    them and the fit proceeds; a resumed fit keeps the checkpoint's choice. See docs/rank_search.md.

    With ``rounds > 1`` the search is successive halving: after each round the better half of the
    candidates (rounded up) trains again, from scratch, for 3x as many steps, and the last round decides.

    Args:
        candidates: ranks to try.
        trial_steps: optimizer steps per trial in the first round (each of ``accumulate_grad_batches`` batches).
            None: 50, or fewer so that the longest round fits in one pass of the training data (within
            ``limit_train_batches``).
        val_batches: validation batches per trial; the val loss is the mean of ``training_step``'s loss
            on them, in eval mode without gradients (averaged over processes under DDP). None: 8, or
            the validation batches within ``limit_val_batches`` if fewer.
        penalty: weight of the relative parameter count, in units of validation loss.
        per_module: spread the chosen rank's parameter budget over the modules by the importance
            of their rank components, measured during the largest candidate's longest trial.
        rounds: rounds of successive halving (1: every candidate once, ``trial_steps`` steps).
    """

    requires = MappingProxyType({"LoRA": (
        "it chooses the rank of the adapters the LoRA callback injects; add LoRA(...) to `callbacks` as well (the"
        " CLI adds it unless --no_lora)."
    )})
    strategies = UNSHARDED
    strategy_refusal = (
        "each trial builds new adapters at its rank after the strategy has sharded the module and built the"
        " optimizer, and a sharded module cannot take in new parameters. Search on one device or under DDP (a"
        " smaller model of the family, or fewer steps), then pass the chosen rank to LoRA(r=...) or"
        " LoRA(rank_pattern=...) of the sharded run."
    )

    def __init__(
        self,
        candidates: Sequence[int] = DEFAULT_CANDIDATES,
        trial_steps: int | None = None,
        val_batches: int | None = None,
        penalty: float = 0.1,
        per_module: bool = False,
        rounds: int = 2,
    ) -> None:
        self.candidates = validate_candidates(candidates)
        for name, value in (("trial_steps", trial_steps), ("val_batches", val_batches)):
            if value is not None:
                check_int(value, name, 1, "Each trial needs at least one step and one validation batch; None adapts.")
        # As asked (None: the default, or what the data offers at fit start), and as used.
        self.requested = {"trial_steps": trial_steps, "val_batches": val_batches}
        self.trial_steps = DEFAULT_TRIAL_STEPS if trial_steps is None else trial_steps
        self.val_batches = DEFAULT_VAL_BATCHES if val_batches is None else val_batches
        self.penalty = validate_penalty(penalty)
        if not isinstance(per_module, bool):
            raise ValueError(f"`per_module` must be True or False; got {per_module!r}.")
        self.per_module = per_module
        self.rounds = check_int(rounds, "rounds", 1, "1 trains every candidate once; 2 (the default) adds a longer round.")
        self.schedule = halving_schedule(len(self.candidates), self.rounds, self.trial_steps)
        # The choice and the trial table; restored from checkpoints so a resumed fit does not search again.
        self.record: dict[str, Any] | None = None
        self._log_pending = False

    # -- Lightning hooks ---------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.begin_setup(trainer, pl_module, stage)
        lora = cast("LoRA", self.required(trainer, "LoRA"))
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "AdaptiveRankSearch trains its trials as Lightning's automatic optimization does; this module sets"
                " `automatic_optimization = False`. Choose the rank by hand with LoRA(r=...)."
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise RuntimeError(
                "AdaptiveRankSearch does not support fp16 gradient scaling yet (precision='16-mixed' on GPU);"
                " use precision='bf16-mixed' or '32-true'."
            )
        if lora.config.rank_pattern:
            rank_zero_warn("AdaptiveRankSearch sets every adapter's rank; the LoRA callback's rank_pattern is ignored.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After strategy setup: the model is on its device (wrapped under DDP) and the optimizers exist.
        if self.record is not None:
            self._check_choice(pl_module)  # a resumed or repeated fit keeps its choice
            return
        if trainer.ckpt_path is not None:
            rank_zero_warn("AdaptiveRankSearch: the checkpoint holds no rank-search choice; keeping its ranks.")
            return
        lora = cast("LoRA", self.required(trainer, "LoRA"))
        # Adapters LoRA injected before fit (e.g. for a test pass) are still untrained: B is zero until a step.
        trained = any(bool(layer.lora_B.any()) for layer in lora_layers(pl_module).values())
        if lora.init_seed is None or trained:
            rank_zero_warn(
                "AdaptiveRankSearch: the module's adapters were trained or loaded before this fit; keeping them"
                " instead of searching."
            )
            return
        self.record = self._search(trainer, pl_module, lora)
        self._log_pending = True
        rank_zero_info(format_table(self.record))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._log_pending or self.record is None:
            return
        self._log_pending = False
        # Epoch-level, so loggers get them whatever log_every_n_steps is (a step-0 value would be dropped).
        for key in ("rank", "params", "trial_steps", "val_batches", "trial_seconds"):
            pl_module.log(f"rank_search/{key}", float(self.record[key]), on_step=False, on_epoch=True, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.record is None else {"record": self.record}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.record = state_dict.get("record")

    # -- the search ----------------------------------------------------------------------------------------

    def _check_choice(self, pl_module: pl.LightningModule) -> None:
        assert self.record is not None
        ranks = {name: layer.r for name, layer in lora_layers(pl_module).items()}
        if ranks != self.record["ranks"]:
            raise RuntimeError(
                "The adapters' ranks differ from the rank-search choice this callback holds (from a checkpoint or"
                " an earlier fit). Resume with the same LoRA settings, or use a new AdaptiveRankSearch."
            )

    def _search(self, trainer: pl.Trainer, pl_module: pl.LightningModule, lora: LoRA) -> dict[str, Any]:
        started = time.perf_counter()
        train, val = self._loaders(trainer)
        layers = lora_layers(pl_module)
        targets = list(layers)
        shapes = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
        largest = adapter_params(shapes, self.candidates[-1])
        at_fit_start = capture_rng()
        snapshot = touched_state(pl_module)
        importance: dict[str, torch.Tensor] = {}
        trials: list[Trial] = []
        survivors = list(self.candidates)
        with outside_the_fit(pl_module) as modes:
            for round_, (steps, _) in enumerate(self.schedule):
                in_round = []
                for rank in survivors:
                    began = time.perf_counter()
                    restore(snapshot)
                    _build(pl_module, lora, targets, rank)
                    restore_rng(at_fit_start)  # every trial: the same data order and dropout draws
                    collect = None
                    if self.per_module and rank == self.candidates[-1]:
                        collect = importance  # the largest rank's longest trial counts
                        importance.clear()
                    loss = self._trial(trainer, pl_module, train, val, modes, steps, collect)
                    params = adapter_params(shapes, rank)
                    in_round.append(Trial(round_, rank, params, loss, score(loss, params, largest, self.penalty),
                                          steps, time.perf_counter() - began))
                    if not trials and len(in_round) == 1:
                        _warn_past_max_time(trainer, in_round[0], search_steps(self.schedule))
                trials += in_round
                following = self.schedule[round_ + 1][1] if round_ + 1 < len(self.schedule) else 1
                survivors = sorted(t.rank for t in best(in_round, following))
        restore(snapshot)

        seconds = _max_over_processes(trainer, [t.seconds for t in trials])
        trials = [replace(trial, seconds=took) for trial, took in zip(trials, seconds)]
        (chosen,) = survivors
        budget = adapter_params(shapes, chosen)
        ranks = (
            allocate_ranks({name: value.cpu() for name, value in importance.items()}, shapes, budget)
            if self.per_module else dict.fromkeys(targets, chosen)
        )
        _build(pl_module, lora, targets, ranks)
        restore_rng(at_fit_start)  # the fit draws what it would have drawn without the trials
        _rebuild_training(trainer, pl_module)
        (total,) = _max_over_processes(trainer, [time.perf_counter() - started])
        return {
            "candidates": list(self.candidates),
            "penalty": self.penalty,
            "per_module": self.per_module,
            "trials": [trial.to_dict() for trial in trials],
            "rank": chosen,
            "ranks": ranks,
            "params": adapter_params(shapes, ranks),
            "trial_steps": sum(trial.steps for trial in trials),
            "val_batches": self.val_batches * len(trials),
            "val_batches_per_trial": self.val_batches,
            "trial_seconds": total,
        }

    def _loaders(self, trainer: pl.Trainer) -> tuple[CombinedLoader, CombinedLoader]:
        """Fresh train and val loaders as the fit loop builds them (distributed samplers under DDP),
        checked to hold the batches a trial needs."""
        accumulate = trainer.accumulate_grad_batches
        why = "trials train on the training data and are scored on validation batches"
        train = fit_dataloader(trainer, trainer.fit_loop._data_source, RunningStage.TRAINING, _WHO, why)
        val = fit_dataloader(trainer, trainer.fit_loop.epoch_loop.val_loop._data_source, RunningStage.VALIDATING, _WHO, why)
        self._fit_to_data(trainer, train, val)
        self._state_cost(trainer)
        longest = self.schedule[-1][0]
        setting = f"{longest} steps in round {len(self.schedule)}" + (
            f" x accumulate_grad_batches={accumulate}" if accumulate > 1 else ""
        )
        check_batches(trainer, train, longest * accumulate, "training", setting, "trial_steps or rounds", _WHO)
        check_batches(trainer, val, self.val_batches, "validation", f"val_batches={self.val_batches}", "val_batches",
                      _WHO)
        return train, val

    def _fit_to_data(self, trainer: pl.Trainer, train: CombinedLoader, val: CombinedLoader) -> None:
        """Unset counts take what one pass of the data offers (within the limits), said once."""
        if self.requested["trial_steps"] is None:
            available = usable_batches(trainer, train, RunningStage.TRAINING)
            budget = trainer.max_steps if trainer.max_steps > 0 else None  # -1: no step budget
            steps, why = fitted_trial_steps(DEFAULT_TRIAL_STEPS, len(self.candidates), self.rounds, available,
                                            trainer.accumulate_grad_batches, budget)
            if why:
                rank_zero_warn(
                    f"{_WHO}: {' and '.join(why)}; using trial_steps={steps} instead of {DEFAULT_TRIAL_STEPS}"
                    f" ({self._steps(steps)} search steps). Set trial_steps to choose{_TRIAL_STEPS_FLAG}."
                )
            self.trial_steps = steps
        if self.requested["val_batches"] is None:
            available = usable_batches(trainer, val, RunningStage.VALIDATING)
            self.val_batches = batch_count("val_batches", None, DEFAULT_VAL_BATCHES, available, _WHO, "validation")
        self.schedule = halving_schedule(len(self.candidates), self.rounds, self.trial_steps)

    def _steps(self, trial_steps: int) -> int:
        return search_steps(halving_schedule(len(self.candidates), self.rounds, trial_steps))

    def _state_cost(self, trainer: pl.Trainer) -> None:
        """Say before the first trial what the search costs, in the fit's own units; past the fit's budget
        (an explicit trial_steps over max_steps), say it as a warning with the fix."""
        steps, trials = search_steps(self.schedule), sum(count for _, count in self.schedule)
        cost = (f"{_WHO}: {trials} trials in {len(self.schedule)} round(s) train {steps} optimizer steps and score"
                f" {trials * self.val_batches} validation batches before the fit's first step")
        if 0 < trainer.max_steps < steps:
            rank_zero_warn(f"{cost}, more than the fit's max_steps={trainer.max_steps}. Lower trial_steps or rounds"
                           f"{_TRIAL_STEPS_FLAG} to keep the search within the fit's budget.")
        else:
            rank_zero_info(f"{cost}.")

    def _trial(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, train: CombinedLoader, val: CombinedLoader,
        modes: dict[str, bool], steps: int, importance: dict[str, torch.Tensor] | None,
    ) -> float:
        """Train the current adapters ``steps`` steps from a fresh optimizer; their val loss."""
        optimizers, schedulers = _init_optimizers_and_lr_schedulers(pl_module)
        (optimizer,) = optimizers  # automatic optimization has exactly one
        params = [p for p in pl_module.parameters() if p.requires_grad]
        accumulate = trainer.accumulate_grad_batches
        batches = take_batches(train, steps * accumulate, "training", _WHO, _FIX)
        for step in range(steps):
            for _ in range(accumulate):
                index, batch = next(batches)
                loss = step_loss(trainer, pl_module, batch, index, trainer.precision_plugin.train_step_context, _WHO)
                (loss / accumulate).backward()
            mean_gradients(trainer, params)
            if importance is not None:
                add_importance(pl_module, importance)
            pl_module.configure_gradient_clipping(optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for config in schedulers:
                if config.interval == "step" and not config.reduce_on_plateau and (step + 1) % config.frequency == 0:
                    config.scheduler.step()

        pl_module.eval()
        total = torch.zeros((), dtype=torch.float64, device=trainer.strategy.root_device)
        with torch.no_grad():
            for index, batch in take_batches(val, self.val_batches, "validation", _WHO, _FIX):
                context = trainer.precision_plugin.val_step_context
                total += step_loss(trainer, pl_module, batch, index, context, _WHO).double()
        restore_modes(pl_module, modes)
        return float(trainer.strategy.reduce(total / self.val_batches, reduce_op="mean"))


# -- helpers ---------------------------------------------------------------------------------------------

def _build(pl_module: pl.LightningModule, lora: LoRA, targets: list[str], ranks: int | dict[str, int]) -> None:
    """Fresh adapters at ``ranks`` from the seed the LoRA callback drew its own from."""
    assert lora.init_seed is not None
    build_adapters(pl_module, lora.config, lora.init_seed, targets, ranks)


def _warn_past_max_time(trainer: pl.Trainer, first: Trial, total_steps: int) -> None:
    """Once the first trial has timed a step: warn when the whole search would outlast ``max_time``, which
    Lightning's Timer counts from the first training step, so the search comes on top of it."""
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    budget = timer.time_remaining() if timer is not None else None
    projected = first.seconds / first.steps * total_steps
    if budget is not None and projected > budget:
        rank_zero_warn(
            f"{_WHO}: its first trial took {first.seconds:.1f} s for {first.steps} steps, so the search's {total_steps}"
            f" steps take about {projected:.0f} s, before max_time's {budget:.0f} s start counting. Lower trial_steps"
            f" or rounds{_TRIAL_STEPS_FLAG}, or choose the rank by hand with LoRA(r=...)."
        )


def _max_over_processes(trainer: pl.Trainer, values: list[float]) -> list[float]:
    """The largest value of each position over processes, so every process records the same."""
    tensor = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    return trainer.strategy.reduce(tensor, reduce_op="max").tolist()


def _rebuild_training(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The adapters are new parameters: rebuild what holds parameters, as the strategy's setup does
    (DDP registers them when it wraps the module; optimizers are built over them)."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy):
        strategy.model = pl_module
        strategy.model_to_device()
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)
    strategy.setup_precision_plugin()
