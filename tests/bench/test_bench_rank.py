"""``lightning-sft bench rank``: objectives, the pick against the sweep, the compute fraction, the
flags it gives the main job (the runs themselves are whole main-job fits, minutes each, so they live
behind the command, not in CI)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_sft.cli.bench import main, rank


def _summary(params: int, test_loss: float, step_seconds: float = 0.1, search: dict | None = None) -> dict[str, Any]:
    summary = {"trainable_params": params, "test_loss_after": test_loss, "test_acc_after": 0.5, "steps": 100,
               "mean_step_time_s": step_seconds}
    if search is not None:
        summary["rank_search"] = search
    return summary


@pytest.mark.parametrize("pick", [8, 4])
def test_pick_objective_gap_and_compute_fraction(pick: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Test loss falls with rank; with penalty 0.1 and 1000 parameters per rank, r=4 has the best objective
    # (0.50 + 0.1 * 4/8 = 0.55 against 0.60 + 0.025 = 0.625 and 0.48 + 0.1 = 0.58).
    losses = {2: 0.60, 4: 0.50, 8: 0.48}
    calls: list[list[str]] = []

    def fake_fit(flags: list[str], seed: int, steps: int, root: Path, threads: int | None) -> dict[str, Any]:
        calls.append(flags)
        if "--lora.r" in flags:
            r = int(flags[flags.index("--lora.r") + 1])
            assert flags[flags.index("--lora.alpha") + 1] == str(2 * r)
            return _summary(1000 * r, losses[r])
        per_module = flags[flags.index("--trainer.callbacks.per_module") + 1] == "true"
        trials = [{"round": 0, "rank": r, "steps": 10, "val_loss": 1.0, "score": 1.0, "seconds": 1.0} for r in losses]
        search = {"rank": pick, "ranks": {"a": pick - 1, "b": pick + 1}, "trials": trials, "trial_steps": 30, "val_batches": 6,
                  "val_batches_per_trial": 2, "trial_seconds": 12.0}
        return _summary(1000 * pick, 0.47 if per_module else losses[pick], search=search)

    monkeypatch.setattr(rank, "_fit", fake_fit)
    result = rank.benchmark([2, 4, 8], [0], 100, 10, 2, 0.1)
    assert len(calls) == 5 and calls[3] == rank.search_flags([2, 4, 8], 10, 2, 0.1, False)
    seed = result["seeds"][0]
    assert seed["best"] == 4 and seed["pick"] == pick
    assert seed["gap"] == pytest.approx({8: 0.58 / 0.55 - 1, 4: 0.0}[pick])
    # Forward-pass equivalents: 3 x 30 steps + 6 batches against 3 x 300 steps + 3 ranks x 2 batches.
    assert seed["compute_fraction"] == pytest.approx(96 / 906)
    assert seed["seconds_fraction"] == pytest.approx(12.0 / 30.0)  # 3 sweep fits of 100 steps x 0.1 s
    assert result["meets_targets"] is (pick == 4)  # 10.6% of the compute; r=8 is 5.5% worse
    assert seed["per_module"]["objective"] == pytest.approx(0.47 + 0.1 * pick / 8)
    report = rank.format_report(result)
    assert f"pick r={pick}" in report and f"identical to the sweep's r={pick} run" in report
    assert ("+5.45%" in report) is (pick == 8)
    assert f"every seed: {'yes' if pick == 4 else 'no'}" in report


@pytest.mark.parametrize("flags", [["--candidates", "4,4"], ["--candidates", "0,2"], ["--seeds", "-1"],
                                   ["--penalty", "-0.1"], ["--steps", "10"], ["--trial-steps", "0"]])
def test_rejects_bad_options(flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["rank", *flags])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("per_module", [False, True])
def test_search_flags_build_the_callback_in_the_main_job(per_module: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags parse as the CLI's fit arguments (no run): a typo would only show after minutes."""
    from lightning_sft import AdaptiveRankSearch, LoRA
    from lightning_sft.cli import SFTCLI

    monkeypatch.setattr(sys, "argv", ["lightning-sft"])
    flags = rank.search_flags([2, 4, 8], 7, 3, 0.2, per_module)
    cli = SFTCLI(args=["--trainer.max_steps", "40", "--model.decay_steps", "40", *flags], run=False)
    (search,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, AdaptiveRankSearch)]
    assert (search.candidates, search.trial_steps, search.val_batches) == ((2, 4, 8), 7, 3)
    assert search.penalty == 0.2 and search.per_module is per_module
    assert any(isinstance(cb, LoRA) for cb in cli.trainer.callbacks)
