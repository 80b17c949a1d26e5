"""Compute budgets for layer dropout, carrying the bandit from one fit to the next, per-block run fractions."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_sft import LayerDropout, LoRA
from lightning_sft.layer_dropout.schedules import drop_probabilities, expected_drop_fraction, rates_within_budget
from lightning_sft.modules import CausalLM
from tiny_fits import tiny_data, tiny_trainer

ARMS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def test_rates_within_budget_keeps_exactly_the_rates_whose_expected_compute_fits() -> None:
    # 6 blocks, first and last protected: rate r skips 4r/6 of the block computations.
    for budget in (1.0, 0.9, 0.8, 0.7):
        kept = rates_within_budget(ARMS, budget, "linear", [6], 1, 1)
        assert kept == tuple(r for r in ARMS if 1 - expected_drop_fraction([drop_probabilities("linear", r, 6, 1, 1)]) <= budget + 1e-9)
    assert rates_within_budget(ARMS, 0.8, "uniform", [6], 1, 1) == (0.3, 0.4, 0.5)
    assert rates_within_budget(ARMS, 1.0, "uniform", [6], 1, 1) == ARMS


def test_an_unreachable_budget_names_the_rate_it_needs() -> None:
    with pytest.raises(ValueError, match=r"needs rate >= 0\.600"):
        rates_within_budget(ARMS, 0.6, "uniform", [6], 1, 1)
    with pytest.raises(ValueError, match="progressive"):
        rates_within_budget(ARMS, 0.9, "progressive", [6], 1, 1)


@pytest.mark.parametrize("budget", [0, -0.5, 1.5, "half", True])
def test_a_bad_budget_is_refused_at_construction(budget: object) -> None:
    with pytest.raises(ValueError, match=r"compute_budget.*\(0, 1\]"):
        LayerDropout(rate="auto", compute_budget=budget)


def _fit(root: Path, dropout: LayerDropout, steps: int = 6) -> None:
    pl.seed_everything(0)
    trainer = tiny_trainer(root, steps, [LoRA(r=4), dropout], limit_val_batches=1)
    trainer.fit(CausalLM(model="tiny-llama", lr=1e-2), datamodule=tiny_data())


def test_auto_under_a_budget_only_tries_the_arms_within_it(tmp_path: Path) -> None:
    # tiny-llama has 2 blocks; unprotected, rate r runs 1 - r of them.
    dropout = LayerDropout(rate="auto", protect_first=0, protect_last=0, decide_every=1, probe_batches=1,
                           compute_budget=0.75)
    _fit(tmp_path, dropout)
    assert dropout.arms == (0.3, 0.4, 0.5)
    assert {d["rate"] for d in dropout.decisions} <= {0.3, 0.4, 0.5}
    assert len(dropout.bandit.pulls) == 3


def test_a_fixed_rate_over_the_budget_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compute_budget=0.5"):
        _fit(tmp_path, LayerDropout(rate=0.2, protect_first=0, protect_last=0, compute_budget=0.5))


def test_continue_from_carries_the_bandit_and_restarts_the_window(tmp_path: Path) -> None:
    first = LayerDropout(rate="auto", protect_first=0, protect_last=0, decide_every=2, probe_batches=1, compute_budget=0.9)
    _fit(tmp_path / "a", first)
    state = first.state_dict()
    second = LayerDropout(rate="auto", protect_first=0, protect_last=0, decide_every=2, probe_batches=1, compute_budget=0.9)
    second.continue_from(state)
    _fit(tmp_path / "b", second)
    # The second fit (global steps 0..6 again) decided as often as the first, on top of its statistics.
    assert len(second.decisions) == 2 * len(first.decisions) == 6
    assert sum(second.bandit.pulls) == 6
    assert second.decisions[:3] == first.decisions
    assert second.batches_seen == 12


def test_run_fractions_count_the_rows_each_block_ran_on(tmp_path: Path) -> None:
    never = LayerDropout(rate=0.0, protect_first=0, protect_last=0)
    _fit(tmp_path / "a", never)
    assert never.run_fractions == {"model.model.layers.0": 1.0, "model.model.layers.1": 1.0}
    often = LayerDropout(rate=0.5, protect_first=0, protect_last=0, per_sample=True)
    _fit(tmp_path / "b", often, steps=20)
    fractions = list(often.run_fractions.values())
    assert len(fractions) == 2 and all(0.2 < f < 0.8 for f in fractions)
