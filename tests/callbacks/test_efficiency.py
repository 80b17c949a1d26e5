"""Tests for the FLOPs ledger, token counting, FLOP measurement, EfficiencyTracker and EfficiencyMonitor."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import RunningStage
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.data import DataLoader, Dataset

from lightning_sft.callbacks.efficiency import EfficiencyMonitor
from lightning_sft.flops import (
    FlopsLedger,
    StepFlopCounter,
    count_tokens,
    flops_ledger,
    report_skipped_flops,
)
from lightning_sft.metrics import EfficiencyTracker

# Tiny causal-LM-shaped setup: fixed 6 real tokens out of SEQ=8 per sample.
VOCAB, DIM, SEQ, BATCH, REAL = 16, 8, 8, 4, 6
TOKENS_PER_BATCH = BATCH * REAL
# Embedding lookups are not matmuls; both Linear layers see inputs that require grad -> 6x.
MEASURED_FLOPS = 6 * (DIM * DIM + DIM * VOCAB) * BATCH * SEQ
SKIPPED = MEASURED_FLOPS / 4
KEYS = (
    "step_time_s",
    "tokens_per_s",
    "trainable_params",
    "total_params",
    "dense_flops_per_step",
    "effective_flops_per_step",
    "flops_ratio",
    "peak_memory_bytes",
)
FLOP_KEYS = ("dense_flops_per_step", "effective_flops_per_step", "flops_ratio")


# -- ledger --------------------------------------------------------------------------------------


def test_ledger_accumulates_per_source_and_consume_clears() -> None:
    ledger = FlopsLedger()
    ledger.report_skipped("sparsity", 10)
    ledger.report_skipped("sparsity", 5.5)
    ledger.report_skipped("layerdrop", 0)
    assert ledger.consume() == {"sparsity": 15.5, "layerdrop": 0.0}
    assert ledger.consume() == {}


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_ledger_rejects_negative_and_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="finite and >= 0"):
        FlopsLedger().report_skipped("x", bad)


def test_ledger_rejects_empty_source() -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        FlopsLedger().report_skipped("", 1)


def test_ledger_is_attached_to_root_module_outside_state_dict() -> None:
    module = nn.Linear(2, 2)
    report_skipped_flops(module, "a", 3)
    assert flops_ledger(module) is flops_ledger(module)
    assert set(module.state_dict()) == {"weight", "bias"}
    assert all(name in {"weight", "bias"} for name, _ in module.named_parameters())
    assert list(module.children()) == []
    assert flops_ledger(module).consume() == {"a": 3.0}
    assert flops_ledger(nn.Linear(2, 2)).consume() == {}


# -- count_tokens --------------------------------------------------------------------------------


def test_count_tokens_rules() -> None:
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert count_tokens({"input_ids": ids, "attention_mask": mask}) == 8
    assert count_tokens({"input_ids": ids, "attention_mask": mask.bool()}) == 8
    assert count_tokens({"input_ids": ids, "labels": ids}) == 10
    assert count_tokens(ids) == 10
    assert count_tokens(torch.zeros(5, dtype=torch.long)) == 5
    assert count_tokens(torch.zeros(2, 5, 7)) == 10  # (batch, seq, hidden): first two dims
    assert count_tokens((ids, torch.zeros(2))) == 10
    assert count_tokens(["not a tensor", {"attention_mask": mask}]) == 8


@pytest.mark.parametrize("batch", [{"pixels": torch.zeros(2, 3)}, ("a", 1), 3.0, []])
def test_count_tokens_type_error_names_tokens_fn(batch: Any) -> None:
    with pytest.raises(TypeError, match="tokens_fn="):
        count_tokens(batch)


# -- FLOP measurement ----------------------------------------------------------------------------


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _measure(model: nn.Module, x: torch.Tensor) -> int:
    counter = StepFlopCounter()
    counter.start()
    try:
        model(x).sum().backward()
    finally:
        flops = counter.stop()
    return flops


def test_flops_of_full_finetuning_are_six_times_matmul_params_times_tokens() -> None:
    model = _mlp()
    tokens = 10
    x = torch.randn(tokens, 8, requires_grad=True)  # as if coming from a trainable embedding
    matmul_params = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    assert _measure(model, x) == 6 * matmul_params * tokens


def test_frozen_first_layer_skips_its_weight_and_input_grads() -> None:
    model = _mlp()
    model[0].requires_grad_(False)
    tokens = 10
    x = torch.randn(tokens, 8)
    w1, w2, w3 = (model[i].weight.numel() for i in (0, 2, 4))
    measured = _measure(model, x)
    # Layer 1: forward only. Layer 2: no input grad either (its input no longer requires grad),
    # so forward + weight grad. Layer 3: forward + input grad + weight grad.
    assert measured == 2 * w1 * tokens + 4 * w2 * tokens + 6 * w3 * tokens
    assert measured < 6 * (w1 + w2 + w3) * tokens


def test_step_flop_counter_total_and_misuse() -> None:
    counter = StepFlopCounter()
    with pytest.raises(RuntimeError, match="start"):
        counter.stop()
    counter.start()
    assert counter.running
    with pytest.raises(RuntimeError, match="already running"):
        counter.start()
    torch.randn(3, 4) @ torch.randn(4, 5)
    assert counter.total() == 2 * 3 * 4 * 5
    assert counter.stop() == 2 * 3 * 4 * 5
    assert not counter.running


# -- EfficiencyTracker ---------------------------------------------------------------------------


def test_tracker_aggregates_ratios_of_totals() -> None:
    tracker = EfficiencyTracker()
    tracker.update(100, 1.0, 1000.0, 800.0)
    tracker.update(300, 1.0, 3000.0, 3000.0)
    out = tracker.compute()
    assert out["tokens_per_s"].item() == pytest.approx(200.0)
    assert out["step_time_s"].item() == pytest.approx(1.0)
    assert out["dense_flops_per_step"].item() == pytest.approx(2000.0)
    assert out["effective_flops_per_step"].item() == pytest.approx(1900.0)
    assert out["flops_ratio"].item() == pytest.approx(3800.0 / 4000.0)


def test_tracker_without_flops_omits_flop_keys() -> None:
    tracker = EfficiencyTracker()
    tracker.update(10, 0.5)
    assert set(tracker.compute()) == {"tokens_per_s", "step_time_s"}
    with pytest.raises(ValueError, match="both"):
        tracker.update(10, 0.5, dense_flops=1.0)


# -- Trainer runs --------------------------------------------------------------------------------


class _TokenData(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(idx)
        mask = torch.zeros(SEQ, dtype=torch.long)
        mask[:REAL] = 1
        return {"input_ids": torch.randint(0, VOCAB, (SEQ,), generator=g), "attention_mask": mask}


class _TinyLM(pl.LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.embed = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        ids = batch["input_ids"]
        logits = self.head(torch.relu(self.hidden(self.embed(ids))))
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1))
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_TokenData(), batch_size=BATCH)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _FakeSkipper(Callback):
    """Pretends to skip SKIPPED FLOPs each batch, reporting before the forward pass."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        report_skipped_flops(pl_module, "fake", SKIPPED)


class _FlopsRecorder(Callback):
    """Records pl_module.flops_per_batch at batch end, from wherever it sits in the callback list."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.values.append(pl_module.flops_per_batch)


def _fit(tmp_path: Path, callbacks: list[Callback], model: pl.LightningModule | None = None, **kwargs: Any) -> list[dict[str, str]]:
    trainer = pl.Trainer(
        max_steps=kwargs.pop("max_steps", 5),
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        callbacks=callbacks,
        log_every_n_steps=kwargs.pop("log_every_n_steps", 1),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )
    trainer.fit(model or _TinyLM())
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


def test_monitor_logs_every_key_with_sane_values(tmp_path: Path) -> None:
    rows = _fit(tmp_path, [EfficiencyMonitor()])
    for key in KEYS:
        assert len(_column(rows, f"efficiency/{key}")) == 5, key
    assert all(v > 0 for v in _column(rows, "efficiency/tokens_per_s"))
    assert all(v > 0 for v in _column(rows, "efficiency/step_time_s"))
    assert all(v > 0 for v in _column(rows, "efficiency/peak_memory_bytes"))
    total = _column(rows, "efficiency/total_params")
    assert total[0] == sum(p.numel() for p in _TinyLM().parameters())
    assert all(t <= n for t, n in zip(_column(rows, "efficiency/trainable_params"), total))
    assert _column(rows, "efficiency/dense_flops_per_step") == [MEASURED_FLOPS] * 5
    assert _column(rows, "efficiency/effective_flops_per_step") == [MEASURED_FLOPS] * 5
    assert _column(rows, "efficiency/flops_ratio") == [1.0] * 5
    # Epoch aggregates (synced through torchmetrics) are logged at train epoch end.
    assert _column(rows, "efficiency/epoch_flops_ratio") == [1.0]
    assert _column(rows, "efficiency/epoch_dense_flops_per_step") == [MEASURED_FLOPS]
    assert _column(rows, "efficiency/epoch_tokens_per_s")[0] > 0
    assert _column(rows, "efficiency/epoch_step_time_s")[0] > 0
    assert not any(key.startswith("efficiency/skipped_flops") for key in rows[0])


def test_frozen_params_are_counted_as_not_trainable(tmp_path: Path) -> None:
    model = _TinyLM()
    model.hidden.requires_grad_(False)
    rows = _fit(tmp_path, [EfficiencyMonitor()], model=model, max_steps=2)
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.hidden.parameters())
    assert _column(rows, "efficiency/trainable_params") == [total - frozen] * 2
    # The frozen layer still needs its input grad (embedding is trainable) but no weight grad.
    assert _column(rows, "efficiency/dense_flops_per_step")[0] == MEASURED_FLOPS - 2 * DIM * DIM * BATCH * SEQ


@pytest.mark.parametrize("skipper_first", [True, False])
def test_skipped_flops_are_subtracted_whatever_the_callback_order(tmp_path: Path, skipper_first: bool) -> None:
    monitor, recorder = EfficiencyMonitor(), _FlopsRecorder()
    callbacks: list[Callback] = [_FakeSkipper(), monitor] if skipper_first else [monitor, _FakeSkipper()]
    rows = _fit(tmp_path, [recorder, *callbacks])  # recorder first: value must be set before batch end
    dense = MEASURED_FLOPS + SKIPPED  # what the step would have cost without skipping
    assert _column(rows, "efficiency/dense_flops_per_step") == [dense] * 5
    assert _column(rows, "efficiency/effective_flops_per_step") == [MEASURED_FLOPS] * 5
    assert _column(rows, "efficiency/skipped_flops/fake") == [SKIPPED] * 5
    assert _column(rows, "efficiency/flops_ratio") == pytest.approx([0.8] * 5)
    assert recorder.values == [MEASURED_FLOPS] * 5
    assert monitor.dense_flops_per_token == dense / TOKENS_PER_BATCH


class _TinyLMWithVal(_TinyLM):
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.head(self.hidden(self.embed(batch["input_ids"])))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_TokenData(), batch_size=BATCH)


class _ValidationSkipper(Callback):
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        report_skipped_flops(pl_module, "val", 1e9)


def test_validation_time_reports_do_not_leak_into_training(tmp_path: Path) -> None:
    rows = _fit(
        tmp_path,
        [_ValidationSkipper(), EfficiencyMonitor()],
        model=_TinyLMWithVal(),
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
    )
    assert _column(rows, "efficiency/effective_flops_per_step") == [MEASURED_FLOPS] * 4
    assert "efficiency/skipped_flops/val" not in rows[0]


class _SkipsFirstEpoch(_TinyLM):
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return -1 if self.current_epoch == 0 else None  # ends the epoch after callbacks' batch start


def test_epoch_cut_short_after_batch_start_stops_the_flop_counter(tmp_path: Path) -> None:
    rows = _fit(tmp_path, [EfficiencyMonitor()], model=_SkipsFirstEpoch(), max_steps=-1, max_epochs=2, limit_train_batches=2)
    assert _get_current_dispatch_mode() is None
    assert _column(rows, "efficiency/dense_flops_per_step") == [MEASURED_FLOPS] * 2


def test_throughput_monitor_sees_effective_flops(tmp_path: Path) -> None:
    throughput = ThroughputMonitor(batch_size_fn=lambda batch: batch["input_ids"].shape[0], window_size=2)
    rows = _fit(tmp_path, [throughput, _FakeSkipper(), EfficiencyMonitor()])
    assert list(throughput._throughputs[RunningStage.TRAINING]._flops) == [MEASURED_FLOPS] * 2
    flops_per_sec = _column(rows, "train/device/flops_per_sec")
    assert len(flops_per_sec) == 4 and all(v > 0 for v in flops_per_sec)


def test_gradient_accumulation_sums_micro_batches_per_step(tmp_path: Path) -> None:
    recorder = _FlopsRecorder()
    rows = _fit(tmp_path, [recorder, _FakeSkipper(), EfficiencyMonitor()], max_steps=3, accumulate_grad_batches=2)
    assert _column(rows, "efficiency/dense_flops_per_step") == [2 * (MEASURED_FLOPS + SKIPPED)] * 3
    assert _column(rows, "efficiency/skipped_flops/fake") == [2 * SKIPPED] * 3
    assert recorder.values == [MEASURED_FLOPS] * 6  # ThroughputMonitor counts per micro-batch
    assert _column(rows, "efficiency/tokens_per_s")[0] == pytest.approx(
        2 * TOKENS_PER_BATCH / _column(rows, "efficiency/step_time_s")[0], rel=1e-6
    )


def test_manual_optimization(tmp_path: Path) -> None:
    rows = _fit(tmp_path, [_FakeSkipper(), EfficiencyMonitor()], model=_TinyLM(manual=True), max_steps=3)
    assert _column(rows, "efficiency/effective_flops_per_step") == [MEASURED_FLOPS] * 3
    assert _column(rows, "efficiency/skipped_flops/fake") == [SKIPPED] * 3


def test_resume_reuses_measurement_and_log_every_n_steps(tmp_path: Path) -> None:
    first = EfficiencyMonitor()
    _fit(tmp_path / "a", [first], max_steps=1)
    resumed = EfficiencyMonitor(log_every_n_steps=2)
    resumed.load_state_dict(first.state_dict())
    resumed.dense_flops_per_token *= 2  # proves the value is reused rather than re-measured
    rows = _fit(tmp_path / "b", [resumed], max_steps=4, log_every_n_steps=2)
    assert [int(row["step"]) for row in rows if row["efficiency/step_time_s"]] == [1, 3]  # 0-based
    assert _column(rows, "efficiency/dense_flops_per_step") == [2 * MEASURED_FLOPS] * 2


def test_measure_flops_false_logs_no_flops(tmp_path: Path) -> None:
    rows = _fit(tmp_path, [_FakeSkipper(), EfficiencyMonitor(measure_flops=False)], max_steps=2)
    assert len(_column(rows, "efficiency/tokens_per_s")) == 2
    assert all(f"efficiency/{key}" not in rows[0] for key in FLOP_KEYS)
    assert _column(rows, "efficiency/skipped_flops/fake") == [SKIPPED] * 2


def test_flop_measurement_failure_warns_and_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_start(self: StepFlopCounter) -> None:
        raise RuntimeError("no dispatch modes here")

    monkeypatch.setattr(StepFlopCounter, "start", broken_start)
    with pytest.warns(UserWarning, match="could not measure FLOPs"):
        rows = _fit(tmp_path, [EfficiencyMonitor()], max_steps=2)
    assert len(_column(rows, "efficiency/step_time_s")) == 2
    assert all(f"efficiency/{key}" not in rows[0] for key in FLOP_KEYS)


def test_constructor_validation_has_hints() -> None:
    with pytest.raises(TypeError, match="tokens_fn=lambda"):
        EfficiencyMonitor(tokens_fn=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="use 1 to log every step"):
        EfficiencyMonitor(log_every_n_steps=0)
    with pytest.raises(ValueError, match=">= 1"):
        EfficiencyMonitor(log_every_n_steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="True or False"):
        EfficiencyMonitor(measure_flops="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prefix"):
        EfficiencyMonitor(prefix=None)  # type: ignore[arg-type]


def test_monitor_counts_tokens_with_tokens_fn(tmp_path: Path) -> None:
    rows = _fit(tmp_path, [EfficiencyMonitor(tokens_fn=lambda batch: 1000)], max_steps=2)
    for tps, secs in zip(_column(rows, "efficiency/tokens_per_s"), _column(rows, "efficiency/step_time_s")):
        assert tps == pytest.approx(1000 / secs, rel=1e-6)
    assert math.isfinite(_column(rows, "efficiency/epoch_tokens_per_s")[0])
