"""The end-of-run summary of the main job: what fine-tuning bought, and what it cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_sft.callbacks.base import run_name


def run_summary(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    before: dict[str, float],
    after: dict[str, float],
    monitor: Any,
    wall_clock_s: float,
    adapter: Path | None,
    diff: Path | None = None,
    fit_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-serialisable record of the run (``monitor`` is the EfficiencyMonitor, if one ran).

    ``fit_metrics`` is ``trainer.callback_metrics`` as the fit left them: a test pass run after the fit
    replaces them (default: the trainer's current ones)."""
    source = trainer.callback_metrics if fit_metrics is None else fit_metrics
    metrics = {key: float(value) for key, value in source.items() if value.numel() == 1}
    totals = dict(getattr(monitor, "fit_totals", None) or {})
    seconds = totals.get("seconds", 0.0)
    summary: dict[str, Any] = {
        "method": run_name(trainer.callbacks),
        "steps": trainer.global_step,
        "train_loss": metrics.get("train_loss"),
        "val_loss": metrics.get("val_loss"),
        "val_acc": metrics.get("val_acc"),
        "test_loss_before": before.get("test_loss"),
        "test_loss_after": after.get("test_loss"),
        "test_acc_before": before.get("test_acc"),
        "test_acc_after": after.get("test_acc"),
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in module.parameters()),
        "tokens_per_s": totals["tokens"] / seconds if seconds else None,
        "mean_step_time_s": seconds / totals["steps"] if totals.get("steps") else None,
        "effective_flops": totals.get("effective_flops") or None,
        "dense_flops": totals.get("dense_flops") or None,
        "wall_clock_s": round(wall_clock_s, 1),
        "adapter": str(adapter) if adapter else None,
        "diff": str(diff) if diff else None,
    }
    return summary


_ROWS = [
    ("method", "method", "{}"),
    ("steps", "optimizer steps", "{:.0f}"),
    ("train_loss", "train loss (last step)", "{:.4f}"),
    ("val_loss", "validation loss", "{:.4f}"),
    ("val_acc", "validation exact match", "{:.1%}"),
    ("test_loss_before", "test loss, before", "{:.4f}"),
    ("test_loss_after", "test loss, after", "{:.4f}"),
    ("test_acc_before", "test exact match, before", "{:.1%}"),
    ("test_acc_after", "test exact match, after", "{:.1%}"),
    ("tokens_per_s", "training tokens/s", "{:,.0f}"),
    ("mean_step_time_s", "mean step time (s)", "{:.3f}"),
    ("trainable_params", "trainable parameters", "{:,.0f}"),
    ("total_params", "total parameters", "{:,.0f}"),
    ("effective_flops", "effective FLOPs (fit)", "{:.3e}"),
    ("dense_flops", "dense-equivalent FLOPs (fit)", "{:.3e}"),
    ("wall_clock_s", "wall clock incl. tests (s)", "{:.1f}"),
    ("adapter", "adapter", "{}"),
    ("diff", "sparse diff", "{}"),
]


def format_summary(summary: dict[str, Any]) -> str:
    """A two-column text table of the rows that have values."""
    rows = [(label, fmt.format(summary[key])) for key, label, fmt in _ROWS if summary.get(key) is not None]
    width = max(len(label) for label, _ in rows)
    value_width = max(len(value) for _, value in rows)
    rule = "-" * (width + value_width + 3)
    lines = ["Run summary", rule] + [f"{label:<{width}}   {value:>{value_width}}" for label, value in rows] + [rule]
    return "\n".join(lines)
