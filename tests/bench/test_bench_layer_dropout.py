"""``lightning-sft bench layer-dropout``: the speed/memory part at a tiny size (the main-job runs of part (b)
take minutes each and stay behind the command), the time-to-target arithmetic and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_sft.bench import layer_dropout
from lightning_sft.cli.bench import main


def test_speed_part_predicts_saved_activations_from_the_blocks_dropped() -> None:
    result = layer_dropout.speed(hidden=32, layers=4, seq=16, batch=2, steps=3)
    rows = {row["rate"]: row for row in result["rows"]}
    assert list(rows) == list(layer_dropout.RATES) and rows[0.0]["ideal_saving"] == 0
    assert result["bytes_per_block"] > 0
    for row in result["rows"]:
        assert row["saved_bytes"] == pytest.approx(row["predicted_bytes"], rel=0.01)
        assert 0 <= row["dropped_fraction"] <= 0.5
        assert (row["ideal_saving"] > 0) == (row["dropped_fraction"] > 0)


def test_time_to_target_uses_the_dense_final_loss_and_training_seconds(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    curves = {
        "dense": [{"step": 50, "seconds": 10.0, "val_loss": 1.0}, {"step": 100, "seconds": 20.0, "val_loss": 0.5}],
        "auto": [{"step": 50, "seconds": 7.0, "val_loss": 0.6}, {"step": 100, "seconds": 14.0, "val_loss": 0.45}],
        "0.2": [{"step": 50, "seconds": 8.0, "val_loss": 0.9}, {"step": 100, "seconds": 16.0, "val_loss": 0.55}],
    }

    def fake_fit(flags: list[str], steps: int, val_every: int, root: Path, threads: int | None) -> list[dict[str, Any]]:
        name = next((n for n, f in layer_dropout.VARIANTS.items() if f == flags), None)
        return curves[name]

    monkeypatch.setattr(layer_dropout, "_fit", fake_fit)
    fit = layer_dropout.time_to_quality(100, 50, None)
    assert fit["target_val_loss"] == 0.5
    assert fit["variants"]["auto"]["time_ratio"] == pytest.approx(14 / 20) and fit["meets_time_target"]
    assert fit["variants"]["0.2"]["seconds_to_target"] is None

    monkeypatch.setattr(layer_dropout, "speed", lambda *a: layer_dropout_speed_stub())
    assert main(["layer-dropout", "--fit-steps", "100", "--val-every", "50", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "0.70x" in out and "not reached" in out and "<= 0.8x the time: yes" in out


def layer_dropout_speed_stub() -> dict[str, Any]:
    row = {"rate": 0.0, "dropped_fraction": 0.0, "step_time_s": 1.0, "achieved_saving": 0.0, "ideal_saving": 0.0,
           "of_ideal": None, "saved_bytes": 2**20, "predicted_bytes": 2**20, "bytes_ratio": 1.0}
    return {"model": {"hidden": 8, "layers": 4, "seq": 4, "batch": 1, "lora_r": 16}, "steps": 1, "dense_flops": 1,
            "dense_saved_bytes": 2**20, "bytes_per_block": 1, "rows": [row], "meets_saving_target": True}
