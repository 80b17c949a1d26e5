"""``EfficiencyMonitor``: logs what a fine-tuning step costs (time, tokens, FLOPs, memory).

The logic lives in :mod:`lightning_sft.flops` and :mod:`lightning_sft.metrics`; this file only
wires it to Lightning hooks. See ``docs/efficiency.md``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_sft.callbacks.base import SFTCallback
from lightning_sft.flops import StepFlopCounter, count_tokens, flops_ledger
from lightning_sft.metrics import EfficiencyTracker


@dataclass
class _Window:
    """Sums over the micro-batches of one optimizer step (one batch without grad accumulation)."""

    tokens: int = 0
    seconds: float = 0.0
    dense_flops: float = 0.0
    effective_flops: float = 0.0
    flop_batches: int = 0
    skipped: dict[str, float] = field(default_factory=dict)


def _peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated since the last reset. Elsewhere: the process's peak RSS (never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # Windows: no peak RSS in the stdlib, current RSS is the best cheap proxy.
        import psutil

        return psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB.


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously; without this, perf_counter() measures launch time only.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EfficiencyMonitor(SFTCallback):
    """Logs per-step throughput, FLOPs (dense vs. effective), parameter counts and peak memory.

    Args:
        tokens_fn: ``batch -> int`` tokens in a batch; defaults to :func:`~lightning_sft.flops.count_tokens`.
        measure_flops: measure the FLOPs of the first training step with ``FlopCounterMode`` and
            extrapolate per token; also sets ``pl_module.flops_per_batch`` for Lightning's
            ``ThroughputMonitor``.
        prefix: prepended to every logged key.
        log_every_n_steps: log step values every n-th optimizer step (epoch values always cover all
            steps). Lightning writes on its own ``Trainer(log_every_n_steps=...)`` cadence and
            repeats the last value on steps this callback skipped, so keep that a multiple of n.
    """

    def __init__(
        self,
        tokens_fn: Callable[[Any], int] | None = None,
        measure_flops: bool = True,
        prefix: str = "efficiency/",
        log_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        if tokens_fn is not None and not callable(tokens_fn):
            raise TypeError(
                f"tokens_fn must be a callable batch -> int, got {type(tokens_fn).__name__}; "
                "e.g. tokens_fn=lambda batch: int(batch['attention_mask'].sum())."
            )
        if not isinstance(measure_flops, bool):
            raise TypeError(f"measure_flops must be True or False, got {measure_flops!r}.")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string such as 'efficiency/', got {type(prefix).__name__}.")
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(
                f"log_every_n_steps must be an int >= 1, got {log_every_n_steps!r}; use 1 to log every step."
            )
        self.tokens_fn = tokens_fn if tokens_fn is not None else count_tokens
        self.measure_flops = measure_flops
        self.prefix = prefix
        self.log_every_n_steps = log_every_n_steps

        self.dense_flops_per_token: float | None = None
        # Rank-local sums over the current fit, for end-of-run summaries.
        self.fit_totals: dict[str, float] = {}
        self._flops_failed = False
        self._counter = StepFlopCounter()
        self._tracker = EfficiencyTracker()
        self._trainable_params = 0
        self._total_params = 0
        self._params_stale = True
        self._sources: set[str] = set()
        self._window = _Window()
        # Per-batch state, reset in on_train_batch_start.
        self._t0 = 0.0
        self._batch_tokens = 0
        self._batch_skipped: dict[str, float] = {}
        self._batch_backward = False
        self._batch_measured: int | None = None

    def run_label(self) -> str:
        return ""  # it measures the run and changes nothing in it

    @property
    def _wants_measurement(self) -> bool:
        return self.measure_flops and not self._flops_failed and self.dense_flops_per_token is None

    # -- lifecycle -----------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_totals = dict.fromkeys(("steps", "tokens", "seconds", "dense_flops", "effective_flops"), 0.0)
        # NCCL can only all-reduce CUDA tensors; other backends sync CPU states fine.
        if trainer.strategy.root_device.type == "cuda":
            self._tracker = self._tracker.to(trainer.strategy.root_device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flops_ledger(pl_module).consume()  # drop reports from sanity-check validation

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Recount on the first batch, after every callback's epoch-start (un)freezing ran.
        self._params_stale = True
        self._window = _Window()  # drop a window a strategy left open across the epoch boundary

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flops_ledger(pl_module).consume()  # validation-time skips are not training FLOPs

    # -- per batch -----------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._params_stale:
            self._total_params = sum(p.numel() for p in pl_module.parameters())
            self._trainable_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            self._params_stale = False
        self._batch_tokens = int(self.tokens_fn(batch))
        self._batch_skipped = {}
        self._batch_backward = False
        self._batch_measured = None
        device = pl_module.device
        if device.type == "cuda" and self._window_is_empty():
            torch.cuda.reset_peak_memory_stats(device)
        if self._wants_measurement:
            try:
                self._counter.start()
            except Exception as err:  # noqa: BLE001 - monitoring must never stop training
                self._fail_flops(err)
        _sync(device)
        self._t0 = time.perf_counter()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs once per backward (per micro-batch, or per manual_backward call): every skip of the
        # work done so far is reported by now, so this batch's value is final for ThroughputMonitor.
        self._collect_skipped(pl_module)
        self._batch_backward = True
        if self._counter.running:
            self._batch_measured = self._counter.total()
        flops = self._batch_flops()
        if flops is not None:
            pl_module.flops_per_batch = flops[1]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        device = pl_module.device
        _sync(device)
        seconds = time.perf_counter() - self._t0
        self._collect_skipped(pl_module)  # late reports still belong to this batch
        if self._counter.running:
            self._stop_counter()
            if self._batch_backward and self._batch_measured is not None and self._batch_tokens > 0:
                skipped = sum(self._batch_skipped.values())
                self.dense_flops_per_token = (self._batch_measured + skipped) / self._batch_tokens

        window = self._window
        window.tokens += self._batch_tokens
        window.seconds += seconds
        for source, flops in self._batch_skipped.items():
            window.skipped[source] = window.skipped.get(source, 0.0) + flops
        flops = self._batch_flops() if self._batch_backward else None
        if flops is not None:
            window.dense_flops += flops[0]
            window.effective_flops += flops[1]
            window.flop_batches += 1
            pl_module.flops_per_batch = flops[1]

        # Same condition under which Lightning's logger connector flushes step metrics.
        if pl_module.automatic_optimization and trainer.fit_loop._should_accumulate():
            return
        self._close_window(trainer, pl_module, device)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._counter.running:  # the epoch was cut short between batch start and end
            self._stop_counter()
        if not self._tracker.update_called:
            return
        values = self._tracker.compute()  # all-reduces the sums across ranks
        # sync_dist averages values that are already identical on every rank; it only keeps
        # Lightning from warning that an epoch-level value was not synced.
        pl_module.log_dict(
            {f"{self.prefix}epoch_{name}": value for name, value in values.items()},
            on_step=False,
            on_epoch=True,
            sync_dist=True,
        )
        self._tracker.reset()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if self._counter.running:
            self._stop_counter()

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # A resumed run reuses the measurement instead of paying FlopCounterMode's overhead again.
        return {"dense_flops_per_token": self.dense_flops_per_token}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dense_flops_per_token = state_dict.get("dense_flops_per_token")

    # -- helpers -------------------------------------------------------------------------------

    def _window_is_empty(self) -> bool:
        return self._window.tokens == 0 and self._window.seconds == 0.0

    def _collect_skipped(self, pl_module: pl.LightningModule) -> None:
        for source, flops in flops_ledger(pl_module).consume().items():
            self._batch_skipped[source] = self._batch_skipped.get(source, 0.0) + flops

    def _batch_flops(self) -> tuple[float, float] | None:
        """(dense, effective) FLOPs of the current batch, or None while they are unknown."""
        skipped = sum(self._batch_skipped.values())
        if self._batch_measured is not None:
            # What ran was measured; the dense step would also have run what was skipped.
            return self._batch_measured + skipped, float(self._batch_measured)
        if self.dense_flops_per_token is None:
            return None
        dense = self.dense_flops_per_token * self._batch_tokens
        return dense, max(dense - skipped, 0.0)

    def _stop_counter(self) -> None:
        try:
            self._counter.stop()
        except Exception as err:  # noqa: BLE001 - monitoring must never stop training
            self._fail_flops(err)

    def _fail_flops(self, err: Exception) -> None:
        self._flops_failed = True
        self._batch_measured = None
        rank_zero_warn(
            f"EfficiencyMonitor could not measure FLOPs ({type(err).__name__}: {err}); training goes on "
            "without FLOP metrics. Pass measure_flops=False to silence this."
        )

    def _close_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule, device: torch.device) -> None:
        window, self._window = self._window, _Window()
        has_flops = window.flop_batches > 0
        for key, value in (("steps", 1), ("tokens", window.tokens), ("seconds", window.seconds),
                           ("dense_flops", window.dense_flops), ("effective_flops", window.effective_flops)):
            self.fit_totals[key] = self.fit_totals.get(key, 0.0) + value
        self._tracker.update(
            window.tokens,
            window.seconds,
            window.dense_flops if has_flops else None,
            window.effective_flops if has_flops else None,
        )
        self._sources.update(window.skipped)
        # Lightning re-writes the last logged step value at every flush, so count steps exactly as
        # its logger connector does (`should_update_logs`) to stay aligned with its flushes.
        if (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % self.log_every_n_steps:
            return
        metrics: dict[str, float] = {
            "step_time_s": window.seconds,
            "tokens_per_s": window.tokens / window.seconds if window.seconds > 0 else 0.0,
            "trainable_params": float(self._trainable_params),
            "total_params": float(self._total_params),
            "peak_memory_bytes": float(_peak_memory_bytes(device)),
        }
        if has_flops:
            metrics["dense_flops_per_step"] = window.dense_flops
            metrics["effective_flops_per_step"] = window.effective_flops
            metrics["flops_ratio"] = window.effective_flops / window.dense_flops if window.dense_flops > 0 else 1.0
        # Sources seen earlier log 0 when silent, so their curves have no gaps.
        for source in sorted(self._sources):
            metrics[f"skipped_flops/{source}"] = window.skipped.get(source, 0.0)
        pl_module.log_dict(
            {f"{self.prefix}{name}": torch.tensor(value, dtype=torch.float64) for name, value in metrics.items()},
            on_step=True,
            on_epoch=False,
        )
