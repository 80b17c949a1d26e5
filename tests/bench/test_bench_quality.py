"""``lightning-sft bench quality``: the per-seed pairing, the targets and the refusals (the runs
themselves are whole main-job fits, minutes each, so they live behind the command, not in CI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_sft.cli.bench import main, quality


def test_pairs_variants_with_dense_per_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], int, int]] = []
    # seed -> dense step time; the sparse variant is 1.5x faster and 0.5 points worse on every seed.
    dense_time = {0: 0.30, 1: 0.20}

    def fake_fit(flags: list[str], seed: int, steps: int, root: Path, threads: int | None) -> dict[str, Any]:
        calls.append((flags, seed, steps))
        sparse = bool(flags)
        return {
            "test_acc_after": 0.300 - 0.005 * sparse + 0.01 * seed,
            "test_loss_after": 0.5,
            "mean_step_time_s": dense_time[seed] / (1.5 if sparse else 1.0),
            "effective_flops": 60.0 if sparse else 100.0,
            "dense_flops": 100.0,
        }

    monkeypatch.setattr(quality, "_fit", fake_fit)
    result = quality.benchmark(["uniform-0.5"], [0, 1], 100)
    # Dense first within each seed, then the variant, with the main job's flags.
    assert [(flags, seed) for flags, seed, _ in calls] == [
        ([], 0), (["--sparsity", "svd"], 0), ([], 1), (["--sparsity", "svd"], 1)
    ]
    row = result["variants"]["uniform-0.5"]
    assert row["speedup"] == pytest.approx(1.5) and row["flops_ratio"] == pytest.approx(0.6)
    assert row["accuracy_delta"] == pytest.approx(-0.005) and row["meets_targets"]
    assert not result["variants"]["dense"]["meets_targets"]  # 1.0x is not faster
    report = quality.format_report(result)
    assert "within 1 point of dense and >= 1.3x faster: uniform-0.5" in report


@pytest.mark.parametrize("flags", [["--variants", "nope"], ["--seeds", "-1"], ["--seeds", "x"], ["--steps", "10"]])
def test_rejects_bad_options(flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["quality", *flags])
    assert exit_info.value.code == 2


def test_every_variant_is_a_valid_main_job_flag_set() -> None:
    """The flags parse as the CLI's fit arguments (no run): a typo would only show after minutes."""
    from lightning_sft.cli import SFTCLI

    for name, (_, flags) in quality.VARIANTS.items():
        cli = SFTCLI(args=["--trainer.max_steps", "40", "--model.decay_steps", "40", *flags], run=False)
        sparsity = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ContextualSparsity"]
        assert bool(sparsity) == (name != "dense"), name
