"""The LayerDropout callback: stochastic layer dropout during training, with an optional bandit-chosen rate.

The logic lives in :mod:`lightning_sft.layer_dropout` (schedules, bandit, block discovery, the
dropper); this file wires it to the Trainer. See ``docs/layer_dropout.md``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info

from lightning_sft.callbacks.base import ForwardWrapper, SFTCallback, beneath_forward_wrappers
from lightning_sft.callbacks.side_loop import (
    batch_count,
    fit_dataloader,
    outside_the_fit,
    step_loss,
    take_batches,
    usable_batches,
)
from lightning_sft.flops import report_skipped_flops
from lightning_sft.layer_dropout.bandit import DiscountedUCB, validate_arms
from lightning_sft.layer_dropout.dropper import LayerDropper
from lightning_sft.layer_dropout.schedules import (
    DEFAULT_GAMMA,
    check_budget,
    drop_probabilities,
    rate_at,
    rates_within_budget,
    validate_rate,
    validate_schedule,
)
from lightning_sft.anatomy.stacks import find_stacks
from lightning_sft.validation import check_block_paths, check_int

FLOPS_SOURCE = "layer_dropout"
DEFAULT_ARMS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_PROBE_BATCHES = 4
_WHO = "LayerDropout(rate='auto')"
# Mixes the seed and the batch counter into one generator seed per step (a large odd multiplier).
_SEED_STRIDE = 0x9E3779B97F4A7C15


def _val_loader(trainer: pl.Trainer) -> Any:
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    why = "its bandit measures progress on a few validation batches"
    return fit_dataloader(trainer, source, RunningStage.VALIDATING, _WHO, why)


class LayerDropout(SFTCallback):
    """Skip transformer blocks at random during training; evaluation always uses every block.

    Args:
        rate: expected fraction of the droppable blocks skipped per step, in [0, 1); or ``"auto"``
            for a discounted-UCB bandit over ``arms`` that re-decides every ``decide_every`` steps.
        schedule: where in depth the drops fall: ``uniform``, ``linear``, ``exponential`` or
            ``progressive`` (linear in depth, ramped in over steps with ``gamma``).
        protect_first, protect_last: blocks at the bottom / top of each stack that are never dropped.
        per_sample: drop per sample (a block runs on the kept rows of the batch) instead of per batch.
        seed: seed of the drop draws; default: the global seed (``torch.initial_seed()``), taken from
            rank 0 so every process draws the same.
        blocks: dotted paths of the ``nn.ModuleList`` stacks to drop from; default: found by structure.
        gamma: ramp speed of the progressive schedule.
        arms, decide_every, probe_batches, discount, exploration: the bandit of ``rate="auto"``: its
            candidate rates, the window length in optimizer steps, the validation batches whose loss
            (all blocks, no dropout) measures progress (None: 4, or all the validation data within
            ``limit_val_batches`` if that is fewer), and its forgetting and exploration factors.
        compute_budget: the largest expected fraction of the blocks' compute a step may run, for a device
            that can afford no more (e.g. 0.6); ``rate="auto"`` then only tries the arms within it, and a
            fixed rate must fit it. ``None``: no limit.

    Runs under every strategy. A skipped block is still called (only its ``forward`` returns the input),
    so FSDP2, FSDP and ZeRO-3 gather and free its weights on every rank alike, and every process drops
    the same blocks (one seed, from rank 0).
    """

    def __init__(
        self,
        rate: float | str = 0.2,
        schedule: str = "uniform",
        protect_first: int = 1,
        protect_last: int = 1,
        per_sample: bool = False,
        seed: int | None = None,
        blocks: Sequence[str] | None = None,
        gamma: float = DEFAULT_GAMMA,
        arms: Sequence[float] = DEFAULT_ARMS,
        decide_every: int = 25,
        probe_batches: int | None = None,
        discount: float = 0.9,
        exploration: float = 1.0,
        compute_budget: float | None = None,
    ) -> None:
        super().__init__()
        self.auto = rate == "auto"
        self.rate = 0.0 if self.auto else validate_rate(rate)
        self.schedule = validate_schedule(schedule)
        self.protect_first = check_int(protect_first, "protect_first", 0, "The first block is often kept (default 1).")
        self.protect_last = check_int(protect_last, "protect_last", 0, "The last block is often kept (default 1).")
        if not isinstance(per_sample, bool):
            raise ValueError(f"`per_sample` must be True or False; got {per_sample!r}.")
        self.per_sample = per_sample
        if seed is not None:
            check_int(seed, "seed", 0, "Leave it None to use the global seed.")
        self.seed = seed
        self.block_paths = check_block_paths(blocks)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma <= 0:
            raise ValueError(f"`gamma` must be a number > 0; got {gamma!r}. 0.001 reaches 63% of the rate after 1000 steps.")
        self.gamma = float(gamma)
        self.arms = validate_arms(arms)
        self.decide_every = check_int(decide_every, "decide_every", 1, "A window of 10-50 steps suits most runs.")
        if probe_batches is not None:
            check_int(probe_batches, "probe_batches", 1, "A few validation batches suffice; None uses up to 4.")
        self.probe_batches = probe_batches
        self.compute_budget = None if compute_budget is None else check_budget(compute_budget)
        self.bandit = DiscountedUCB(len(self.arms), discount, exploration) if self.auto else None
        # Under a budget the arms are cut in `setup`; a state loaded before then waits for it.
        self._pending_state: dict[str, Any] | None = None
        self.run_fractions: dict[str, float] = {}  # each block's fraction of training rows run, after a fit

        self.dropper: LayerDropper | None = None
        self.stack_sizes: list[int] = []
        self.batches_seen = 0
        self.arm = 0
        self.decisions: list[dict[str, float]] = []
        self._pl_module: pl.LightningModule | None = None
        self._formats: dict[str, int] = {}  # from a checkpoint, applied once the dropper exists
        self._probe: list[Any] = []
        # The bandit's open window: the probe loss at its start, its training seconds, its first step.
        self._window_loss: float | None = None
        self._window_seconds = 0.0
        self._window_start = 0
        self._t0 = 0.0

    # -- set-up ------------------------------------------------------------------------------------

    def run_label(self) -> str:
        return "layer-dropout " + ("auto" if self.auto else f"{self.rate:g}")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.dropper is not None:
            return
        self.begin_setup(trainer, pl_module, stage)
        stacks = find_stacks(pl_module, self.block_paths)
        self.stack_sizes = [len(stack) for _, stack in stacks]
        allowed = self.allowed_rates(self.stack_sizes)
        if self.bandit is not None and allowed != self.arms:
            self.arms = allowed
            self.bandit = DiscountedUCB(len(allowed), self.bandit.discount, self.bandit.exploration)
        for (name, _), size in zip(stacks, self.stack_sizes):
            rates = self.arms if self.auto else (self.rate,)
            for rate in rates:  # fail now, not at step 1000, if a rate is infeasible for this stack
                try:
                    drop_probabilities(self.schedule, rate, size, self.protect_first, self.protect_last)
                except ValueError as error:
                    raise ValueError(f"LayerDropout on {name!r}: {error}") from None
        if self.auto:
            _val_loader(trainer)  # refuse a fit without validation data before touching the model
        seed = self.seed if self.seed is not None else torch.initial_seed() % 2**63
        self.seed = int(trainer.strategy.broadcast(seed, src=0))
        blocks = [(f"{name}.{i}", block) for name, stack in stacks for i, block in enumerate(stack)]
        self._pl_module = pl_module
        self.dropper = LayerDropper(blocks, on_skip=self._report)
        self.dropper.install()
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def forward_wrappers(self) -> list[ForwardWrapper]:
        return [self.dropper] if self.dropper is not None else []

    def allowed_rates(self, stack_sizes: Sequence[int]) -> tuple[float, ...]:
        """The rates this callback may use on stacks of these sizes: its arms (or its rate) within the budget."""
        rates = self.arms if self.auto else (self.rate,)
        if self.compute_budget is None:
            return rates
        return rates_within_budget(
            rates, self.compute_budget, self.schedule, stack_sizes, self.protect_first, self.protect_last
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.dropper is not None:
            self.run_fractions = self.dropper.run_fractions()
            with beneath_forward_wrappers(trainer, leaving=self.dropper):
                self.dropper = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.dropper is not None
        # DDP and FSDP need every trainable parameter in the graph on every process, so a skipped block
        # then touches its own with a zero weight.
        self.dropper.load_formats(self._formats)  # a resumed fit drops from its first step, as the original did
        self.dropper.ghost = trainer.world_size > 1
        if self.auto:
            loader = _val_loader(trainer)
            available = usable_batches(trainer, loader, RunningStage.VALIDATING)
            count = batch_count("probe_batches", self.probe_batches, DEFAULT_PROBE_BATCHES, available, _WHO, "validation")
            self._probe = [batch for _, batch in take_batches(loader, count, "validation", _WHO, "probe_batches")]
            if self._window_loss is None:
                self._window_loss = self._probe_loss(trainer, pl_module)
                self._window_start = trainer.global_step

    # -- per batch ---------------------------------------------------------------------------------

    def current_rate(self, step: int) -> float:
        rate = self.arms[self.arm] if self.auto else self.rate
        return rate_at(self.schedule, rate, step, self.gamma)

    def probabilities(self, step: int) -> list[float]:
        """The drop probability of every controlled block at ``step``, stack after stack."""
        rate = self.current_rate(step)
        return [
            p for size in self.stack_sizes
            for p in drop_probabilities(self.schedule, rate, size, self.protect_first, self.protect_last)
        ]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.dropper is not None
        generator = torch.Generator().manual_seed((self.seed * _SEED_STRIDE + self.batches_seen) % 2**63)
        probabilities = self.probabilities(trainer.global_step)
        if self.per_sample:
            self.dropper.plan_samples(probabilities, generator)
        else:
            self.dropper.plan_layers(probabilities, generator)
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self.dropper is not None
        self._sync(pl_module)
        self._window_seconds += time.perf_counter() - self._t0
        dropped = self.dropper.dropped_fraction()
        self.dropper.clear()
        self.batches_seen += 1
        pl_module.log_dict(
            {"layer_dropout/rate": self.current_rate(trainer.global_step), "layer_dropout/dropped_fraction": dropped},
            on_step=True, on_epoch=False,
        )
        if self.auto and trainer.global_step - self._window_start >= self.decide_every:
            self._decide(trainer, pl_module)

    def _report(self, flops: float) -> None:
        assert self._pl_module is not None
        report_skipped_flops(self._pl_module, FLOPS_SOURCE, flops)

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    # -- the bandit --------------------------------------------------------------------------------

    def _probe_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Mean loss of the probe batches with every block (eval mode, no gradients), over processes."""
        total = torch.zeros((), dtype=torch.float64, device=trainer.strategy.root_device)
        with outside_the_fit(pl_module), torch.no_grad():
            pl_module.eval()
            for index, batch in enumerate(self._probe):
                context = trainer.precision_plugin.val_step_context
                total += step_loss(trainer, pl_module, batch, index, context, _WHO).double()
        return float(trainer.strategy.reduce(total / len(self._probe), reduce_op="mean"))

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the window: reward = probe-loss decrease per training second; pick the next arm."""
        assert self.bandit is not None and self._window_loss is not None
        loss = self._probe_loss(trainer, pl_module)
        seconds = float(trainer.strategy.reduce(
            torch.tensor(self._window_seconds, dtype=torch.float64, device=trainer.strategy.root_device), reduce_op="max"
        ))
        reward = (self._window_loss - loss) / max(seconds, 1e-9)
        self.bandit.update(self.arm, reward)
        chosen = self.bandit.select()
        self.decisions.append({
            "step": trainer.global_step, "rate": self.arms[self.arm], "loss_before": self._window_loss,
            "loss_after": loss, "seconds": seconds, "reward": reward, "next_rate": self.arms[chosen],
        })
        pl_module.log_dict(
            {"layer_dropout/reward": reward, "layer_dropout/probe_loss": loss, "layer_dropout/next_rate": self.arms[chosen]},
            on_step=True, on_epoch=False,
        )
        means = self.bandit.means()
        pl_module.log_dict(
            {f"layer_dropout/arm_{rate:g}_mean_reward": mean for rate, mean in zip(self.arms, means) if mean is not None},
            on_step=True, on_epoch=False,
        )
        rank_zero_info(
            f"LayerDropout(auto) step {trainer.global_step}: rate {self.arms[self.arm]:g} -> probe loss"
            f" {self._window_loss:.4f} -> {loss:.4f} in {seconds:.1f} s (reward {reward:.4g}/s); next rate {self.arms[chosen]:g}"
        )
        self.arm = chosen
        self._window_loss = loss
        self._window_seconds = 0.0
        self._window_start = trainer.global_step

    # -- checkpointing -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        formats = self.dropper.formats() if self.dropper is not None else self._formats
        state: dict[str, Any] = {"seed": self.seed, "batches_seen": self.batches_seen, "formats": formats}
        if self.bandit is not None:
            state.update(
                arm=self.arm, bandit=self.bandit.state_dict(), arms=list(self.arms), decisions=list(self.decisions),
                window_loss=self._window_loss, window_seconds=self._window_seconds, window_start=self._window_start,
            )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.auto and self.compute_budget is not None and self.dropper is None:  # arms not cut yet
            self._pending_state = dict(state_dict)
            return
        self.seed = state_dict["seed"]
        self.batches_seen = state_dict["batches_seen"]
        self._formats = dict(state_dict["formats"])
        if self.bandit is not None:
            if "bandit" not in state_dict:
                raise ValueError("The checkpoint's LayerDropout had a fixed rate; resume it with the same rate, not 'auto'.")
            if tuple(state_dict["arms"]) != self.arms:
                raise ValueError(f"The checkpoint's bandit has arms {state_dict['arms']}, this one {list(self.arms)}.")
            self.bandit.load_state_dict(state_dict["bandit"])
            self.arm = state_dict["arm"]
            self.decisions = list(state_dict["decisions"])
            self._window_loss = state_dict["window_loss"]
            self._window_seconds = state_dict["window_seconds"]
            self._window_start = state_dict["window_start"]

    def continue_from(self, state_dict: dict[str, Any]) -> None:
        """Start the next fit where another fit's ``state_dict()`` left off, e.g. the next federated round.

        The bandit's statistics, its current arm and the draw counter carry over; the open window
        restarts, since the weights changed between the fits (aggregation) and its start loss is stale.
        """
        restarted = dict(state_dict)
        if "bandit" in restarted:
            restarted.update(window_loss=None, window_seconds=0.0, window_start=0)
        self.load_state_dict(restarted)
