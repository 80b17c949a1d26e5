"""AdaptiveRankSearch: the scoring rule and per-module allocation, search-then-train equal to training the
chosen rank from scratch (bit for bit), resume without a new search, 2-process DDP agreement, refusals."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from ddp_helpers import HELPERS, run_ddp_and_compare_adapters
from lightning_sft import AdaptiveRankSearch, LoRA, LoRAConfig, inject_lora, lora_layers
from lightning_sft.callbacks import rank_search as rank_search_callback
from lightning_sft.callbacks.rank_search import _warn_past_max_time
from lightning_sft.cli import SFTCLI
from lightning_sft.data import RandomTokenData
from lightning_sft.modules import CausalLM
from lightning_sft.rank_search import (
    Trial,
    adapter_params,
    allocate_ranks,
    best,
    component_importance,
    config_at_ranks,
    halving_schedule,
    score,
)
from tiny_models import build

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.py


# --- the pure rules ----------------------------------------------------------------------------------


def _trial(rank: int, val_loss: float, penalty: float = 0.1, largest: int = 32) -> Trial:
    return Trial(0, rank, rank * 10, val_loss, score(val_loss, rank * 10, largest * 10, penalty), 5, 1.0)


def test_score_is_val_loss_plus_penalty_times_relative_params() -> None:
    assert score(1.5, 400, 1600, 0.2) == pytest.approx(1.5 + 0.2 * 0.25)
    assert score(1.5, 400, 1600, 0.0) == 1.5
    assert score(float("nan"), 400, 1600, 0.1) == math.inf


def test_best_is_the_lowest_score_ties_to_the_smaller_rank_and_refuses_all_diverged() -> None:
    # r=8 has the lowest loss, but its penalty (0.1 * 8/32) costs more than the 0.01 it gains over r=4.
    trials = [_trial(2, 1.10), _trial(4, 1.00), _trial(8, 0.99), _trial(32, float("nan"))]
    assert [t.rank for t in best(trials, 3)] == [4, 8, 2]
    assert [t.rank for t in best(trials, 5)] == [4, 8, 2]  # a diverged trial never goes on
    tied = [Trial(0, 8, 80, 1.0, 1.25, 5, 1.0), Trial(0, 4, 40, 1.0, 1.25, 5, 1.0)]
    assert best(tied)[0].rank == 4
    with pytest.raises(RuntimeError, match="Every rank-search trial diverged"):
        best([_trial(2, float("inf")), _trial(4, float("nan"))])


def test_halving_schedule_keeps_the_better_half_for_three_times_as_long() -> None:
    assert halving_schedule(5, 2, 50) == [(50, 5), (150, 3)]
    assert halving_schedule(5, 4, 10) == [(10, 5), (30, 3), (90, 2)]  # a round of one would decide nothing
    assert halving_schedule(2, 3, 10) == [(10, 2)]
    assert halving_schedule(5, 1, 50) == [(50, 5)]


def _adapted(config: LoRAConfig) -> torch.nn.Module:
    model = build("llama")
    inject_lora(model, config)
    return model


def test_adapter_params_count_what_lora_trains() -> None:
    shapes = {n: (l.in_features, l.out_features) for n, l in lora_layers(_adapted(LoRAConfig(r=1))).items()}
    ranks = {name: 1 + i % 3 for i, name in enumerate(shapes)}
    model = _adapted(LoRAConfig(rank_pattern=ranks))
    assert adapter_params(shapes, ranks) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapter_params(shapes, 4) == 4 * adapter_params(shapes, 1)


def test_config_at_ranks_keeps_each_module_scale() -> None:
    config = LoRAConfig(r=8, alpha=16, alpha_pattern={"v_proj": 32}, rank_pattern={"o_proj": 4})
    configured = lora_layers(_adapted(config))
    targets = list(configured)
    layers = lora_layers(_adapted(config_at_ranks(config, targets, 2)))
    assert {layer.r for layer in layers.values()} == {2}  # rank_pattern superseded
    # q: 16/8, v: 32/8, o: 16/4 as configured, each kept
    assert {n: l.scaling for n, l in layers.items()} == {n: l.scaling for n, l in configured.items()}

    per_module = {name: 1 + i % 5 for i, name in enumerate(targets)}
    assert {n: l.r for n, l in lora_layers(_adapted(config_at_ranks(config, targets, per_module))).items()} == per_module

    rslora = LoRAConfig(r=8, alpha=16, use_rslora=True)
    # rsLoRA's alpha / sqrt(r) is already its rank-stable scale: alpha stays.
    assert {l.alpha for l in lora_layers(_adapted(config_at_ranks(rslora, targets, 2))).values()} == {16}


def test_component_importance_is_the_first_order_loss_change_of_removing_it() -> None:
    # Scaling component i by c_i: dL/dc_i = sum(B[:, i] dL/dB[:, i]) = sum(A[i] dL/dA[i]); the score is both, |.|.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g, requires_grad=True), torch.randn(4, 3, generator=g, requires_grad=True)
    x, target = torch.randn(6, 5, generator=g), torch.randn(6, 4, generator=g)
    ((x @ a.t()) @ b.t() - target).pow(2).mean().backward()
    c = torch.ones(3, requires_grad=True)
    ((x @ a.detach().t() * c) @ b.detach().t() - target).pow(2).mean().backward()
    importance = component_importance(a.detach(), b.detach(), a.grad, b.grad)
    torch.testing.assert_close(importance, 2 * c.grad.abs())


def test_allocation_spends_the_budget_on_importance_per_parameter() -> None:
    shapes = {"a": (10, 10), "b": (10, 10), "c": (50, 50)}  # component costs 20, 20, 100
    importance = {
        "a": torch.tensor([8.0, 7.0, 6.0, 5.0]),  # per parameter 0.40 0.35 0.30 0.25
        "b": torch.tensor([0.1, 0.1, 0.1, 0.1]),  # 0.005
        "c": torch.tensor([50.0, 41.0, 1.0, 1.0]),  # 0.50 0.41 0.01 0.01
    }
    budget = adapter_params(shapes, 2)  # 280
    ranks = allocate_ranks(importance, shapes, budget)
    # Every module keeps one; then c1 (0.41, 100) and a1, a2 (0.35, 0.30; 20 each) fill the remaining 140 exactly.
    assert ranks == {"a": 3, "b": 1, "c": 2} and adapter_params(shapes, ranks) == budget
    swapped = allocate_ranks({"a": importance["b"], "b": importance["a"], "c": importance["c"]}, shapes, budget)
    assert swapped == {"a": 1, "b": 3, "c": 2}
    assert allocate_ranks(importance, shapes, adapter_params(shapes, 4)) == {"a": 4, "b": 4, "c": 4}
    with pytest.raises(ValueError, match="cannot give each of 3 modules rank 1"):
        allocate_ranks(importance, shapes, 139)


# --- through Lightning ----------------------------------------------------------------------------------




class _UnfreezeNorm(pl.Callback):
    """A callback training one more tensor: trials must leave it as they found it."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.model.model.norm.weight.requires_grad_(True)


def _data(num_train: int = 24) -> RandomTokenData:
    """Batches of 4 sequences: 6 training batches by default, 2 validation batches."""
    data = RandomTokenData(seq_len=16, batch_size=4, num_train=num_train, num_val=8)
    data.setup("fit")
    return data


def _trainer(root: Path, steps: int, callbacks: list[pl.Callback], **kwargs) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", callbacks=callbacks, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, **kwargs)


def _fit_shuffled(root: Path, callbacks: list[pl.Callback], steps: int = 4) -> tuple[CausalLM, pl.Trainer]:
    """Shuffled batches (the global RNG picks the order) and adapter dropout: every random draw counts."""
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama", lr=1e-2, warmup_steps=2)
    data = _data(num_train=40)
    train = DataLoader(data.train_dataloader().dataset, batch_size=4, shuffle=True)
    trainer = _trainer(root, steps, callbacks)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=data.val_dataloader())
    return module, trainer


def _trained(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_search_then_training_equals_training_the_chosen_rank_from_scratch(tmp_path: Path) -> None:
    # penalty 1 makes the smallest candidate win (the losses differ by far less); LoRA is configured at 4
    # and the last trial ran at 4, so the fit's adapters are rebuilt, not left over.
    search = AdaptiveRankSearch(candidates=(2, 4, 8), trial_steps=3, val_batches=2, penalty=1.0)
    searched, trainer = _fit_shuffled(tmp_path / "a", [LoRA(r=4, alpha=8, dropout=0.1), _UnfreezeNorm(), search])
    record = search.record
    # Round 1: every rank, 3 steps; round 2: the better two, 9 steps.
    assert [(t["round"], t["rank"], t["steps"]) for t in record["trials"]] == [
        (0, 2, 3), (0, 4, 3), (0, 8, 3), (1, 2, 9), (1, 4, 9)
    ]
    assert record["rank"] == 2
    assert len({t["val_loss"] for t in record["trials"]}) == 5  # each trial trained its own adapters
    assert record["trial_steps"] == 27 and record["val_batches"] == 10 and record["trial_seconds"] > 0
    assert trainer.global_step == 4 and float(trainer.callback_metrics["rank_search/rank"]) == 2
    assert "log" not in vars(searched)  # self.log is the LightningModule's again

    scratch, _ = _fit_shuffled(tmp_path / "b", [LoRA(r=2, alpha=4, dropout=0.1), _UnfreezeNorm()])
    expected, got = _trained(scratch), _trained(searched)
    assert got.keys() == expected.keys() and "model.model.norm.weight" in got and len(got) == 29
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert record["params"] == sum(v.numel() for n, v in got.items() if n.endswith(("lora_A", "lora_B")))


def test_an_unset_trial_steps_keeps_the_search_within_max_steps_and_the_cost_is_said_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said: list[str] = []
    monkeypatch.setattr(rank_search_callback, "rank_zero_info", said.append)  # whatever logging's set-up
    search = AdaptiveRankSearch(candidates=(2, 4, 8), val_batches=1, penalty=1.0)
    # 3 trials of s steps, then 2 of 3s: 9s search steps; max_steps=20 allows s=2 (the data alone would allow 3).
    with pytest.warns(UserWarning, match=r"max_steps=20 steps and the search trains at most as many; using"
                                         r" trial_steps=2 instead"):
        _fit_shuffled(tmp_path, [LoRA(r=4), search], steps=20)
    assert search.trial_steps == 2 and search.record["trial_steps"] == 18 <= 20
    cost = next(i for i, m in enumerate(said) if "train 18 optimizer steps and score 5 validation batches" in m)
    assert cost < next(i for i, m in enumerate(said) if "val loss" in m)  # before the trial table


def test_an_explicit_trial_steps_past_max_steps_is_said_before_the_search(tmp_path: Path) -> None:
    search = AdaptiveRankSearch(candidates=(2, 4), trial_steps=3, val_batches=1, rounds=1)
    with pytest.warns(UserWarning, match=r"2 trials in 1 round\(s\) train 6 optimizer steps .* more than the fit's"
                                         r" max_steps=2\. Lower trial_steps or rounds .*--trainer.callbacks.trial_steps"):
        _fit_shuffled(tmp_path, [LoRA(r=4), search], steps=2)


def test_a_search_outlasting_max_time_is_said_after_its_first_trial() -> None:
    trainer = SimpleNamespace(callbacks=[Timer(duration=dict(seconds=60))])
    first = Trial(round=0, rank=2, params=10, val_loss=1.0, score=1.0, steps=5, seconds=10.0)
    with pytest.warns(UserWarning, match=r"search's 50 steps take about 100 s, before max_time's 60 s start counting"):
        _warn_past_max_time(trainer, first, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_past_max_time(trainer, first, 25)  # 50 s: within the budget, nothing said
        _warn_past_max_time(SimpleNamespace(callbacks=[]), first, 50)  # no max_time


def _fit_epochs(root: Path, steps: int, seed: int, callbacks: list[pl.Callback], ckpt_path: Path | None = None) -> CausalLM:
    pl.seed_everything(seed)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    checkpointing = any(isinstance(cb, pl.callbacks.ModelCheckpoint) for cb in callbacks)
    # 12 sequences in batches of 4: an epoch is 3 steps, so step 3 is an epoch boundary.
    _trainer(root, steps, callbacks, enable_checkpointing=checkpointing).fit(
        module, datamodule=RandomTokenData(seq_len=16, batch_size=4, num_train=12, num_val=4), ckpt_path=ckpt_path
    )
    return module


def _search() -> AdaptiveRankSearch:
    return AdaptiveRankSearch(candidates=(2, 4, 8), trial_steps=2, val_batches=1, penalty=1.0, rounds=1)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_keeps_the_choice_and_does_not_search_again(tmp_path: Path) -> None:
    straight = _trained(_fit_epochs(tmp_path / "a", 6, 0, [LoRA(r=4, alpha=8), _search()]))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first_search = _search()
    _fit_epochs(tmp_path / "b", 3, 0, [LoRA(r=4, alpha=8), first_search, ckpt])
    (path,) = list((tmp_path / "ckpt").glob("*.ckpt"))

    resumed_search = _search()
    resumed_search._search = None  # calling it would fail the fit
    with pytest.warns(UserWarning, match="take their rank and alpha from the checkpoint"):
        resumed = _fit_epochs(tmp_path / "c", 6, 123, [LoRA(r=4, alpha=8), resumed_search], ckpt_path=path)
    assert resumed_search.record == first_search.record and first_search.record["rank"] == 2
    # Rank 2 with alpha 4 (alpha / r as configured); LoRA's configured alpha 8 would double the update.
    assert {(l.r, l.alpha) for l in lora_layers(resumed).values()} == {(2, 4.0)}
    got = _trained(resumed)
    assert got.keys() == straight.keys() and len(got) == 28
    for name in straight:
        torch.testing.assert_close(got[name], straight[name], rtol=0, atol=0)


def test_per_module_ranks_fill_the_chosen_budget(tmp_path: Path) -> None:
    search = AdaptiveRankSearch(candidates=(2, 8), trial_steps=3, val_batches=1, penalty=1.0, per_module=True)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    _trainer(tmp_path, 2, [LoRA(r=4), search]).fit(module, datamodule=_data())
    record = search.record
    layers = lora_layers(module)
    assert record["rank"] == 2 and record["ranks"] == {n: l.r for n, l in layers.items()}
    uniform = sum(2 * (l.in_features + l.out_features) for l in layers.values())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trainable == record["params"] <= uniform and min(record["ranks"].values()) >= 1
    assert len(set(record["ranks"].values())) > 1  # importance moved rank between modules
    assert {l.alpha / l.r for l in layers.values()} == {16 / 4}  # alpha follows each module's rank (LoRA default alpha 16)


def test_two_process_ddp_ranks_agree_on_the_choice_and_the_adapters(tmp_path: Path) -> None:
    script = HELPERS / "ddp_rank_search_script.py"
    run_ddp_and_compare_adapters(script, tmp_path, expected_tensors=28)
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0]["first_ids"] != records[1]["first_ids"]  # the processes trained on different batches
    first, second = records[0]["record"], records[1]["record"]
    for record in (first, second):
        record.pop("trial_seconds")
        for trial in record["trials"]:
            trial.pop("seconds")
    assert first == second and first["rank"] == 2 and len(first["trials"]) == 5
    assert first["ranks"] == records[0]["layer_ranks"] == records[1]["layer_ranks"]
    assert len(set(first["ranks"].values())) > 1


# --- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"candidates": ()}, "empty"),
        ({"candidates": (0, 4)}, "positive integers"),
        ({"candidates": (-2,)}, "positive integers"),
        ({"candidates": (2.5, 4)}, "positive integers"),
        ({"candidates": (4, 8, 4)}, "repeats"),
        ({"candidates": "4,8"}, "sequence of ranks"),
        ({"penalty": -0.1}, "penalty"),
        ({"penalty": float("nan")}, "penalty"),
        ({"trial_steps": 0}, "trial_steps"),
        ({"val_batches": 0}, "val_batches"),
        ({"per_module": "yes"}, "per_module"),
        ({"rounds": 0}, "rounds"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdaptiveRankSearch(**kwargs)


class _ManualModule(CausalLM):
    def __init__(self) -> None:
        super().__init__(model="tiny-llama")
        self.automatic_optimization = False


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("no_lora", "add LoRA"),
        ("twice", "added 2 times"),
        ("too_many_steps", r"needs 7 training batches \(7 steps in round 1\), but the training data has 6"),
        ("too_long_second_round", r"needs 9 training batches \(9 steps in round 2\), but the training data has 6"),
        ("too_many_val_batches", r"needs 3 validation batches \(val_batches=3\), but the validation data has 2"),
        ("no_val_data", "needs a val_dataloader"),
        ("manual", "automatic_optimization = False"),
        ("fp16_scaler", "fp16 gradient scaling"),
    ],
)
def test_bad_setups_are_refused_before_training(case: str, match: str, tmp_path: Path) -> None:
    module = _ManualModule() if case == "manual" else CausalLM(model="tiny-llama")
    search = AdaptiveRankSearch(candidates=(2, 4, 8) if case == "too_long_second_round" else (2, 4),
                                trial_steps={"too_many_steps": 7, "too_long_second_round": 3}.get(case, 2),
                                val_batches=3 if case == "too_many_val_batches" else 1)
    callbacks = [search] if case == "no_lora" else [LoRA(r=4), search]
    kwargs: dict = {}
    if case == "fp16_scaler":
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    trainer = _trainer(tmp_path, 2, callbacks, **kwargs)
    if case == "twice":  # the Trainer refuses two at construction (stateful callbacks); this one came later
        trainer.callbacks.append(AdaptiveRankSearch())
    data = _data()  # 6 training batches, 2 validation batches
    with pytest.raises((ValueError, RuntimeError), match=match):
        if case == "no_val_data":
            trainer.fit(module, train_dataloaders=data.train_dataloader())
        else:
            trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0


# --- the command line --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("on", ((2, 4, 8, 16, 32), False)), ("per-module", ((2, 4, 8, 16, 32), True)), ("16,4,8", ((4, 8, 16), False))],
)
def test_rank_search_flag_adds_the_callback(value: str, expected: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-sft"])
    cli = SFTCLI(args=["--rank-search", value, "--trainer.max_steps", "40", "--model.decay_steps", "40"], run=False)
    (search,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, AdaptiveRankSearch)]
    assert (search.candidates, search.per_module) == expected
    off = SFTCLI(args=["--trainer.max_steps", "40", "--model.decay_steps", "40"], run=False)
    assert not [cb for cb in off.trainer.callbacks if isinstance(cb, AdaptiveRankSearch)]


@pytest.mark.parametrize("value", ["maybe", "4,x", "4,4", "0"])
def test_bad_rank_search_flag_is_a_usage_error(value: str, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-sft"])
    with pytest.raises(SystemExit) as exit_info:
        SFTCLI(args=["fit", "--rank-search", value])
    assert exit_info.value.code == 2 and "--rank-search" in capsys.readouterr().err


def test_main_job_searches_after_the_pre_fit_test_pass_and_reports_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # `fit` scores the base on the test split first, which makes LoRA inject (untrained) adapters already.
    monkeypatch.setattr(sys, "argv", ["lightning-sft"])
    cli = SFTCLI(args=[
        "fit", "--trainer.max_steps", "3", "--model.decay_steps", "40", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.val_check_interval", "3", "--data.num_train", "24", "--data.num_val", "8", "--data.num_test", "8",
        "--data.batch_size", "8", "--trainer.callbacks+=AdaptiveRankSearch", "--trainer.callbacks.candidates", "[2,4]",
        "--trainer.callbacks.trial_steps", "2", "--trainer.callbacks.val_batches", "1",
    ])
    summary = json.loads((Path(cli.trainer.log_dir) / "summary.json").read_text())
    record = summary["rank_search"]
    assert [t["rank"] for t in record["trials"]] == [2, 4] and record["trial_steps"] == 4
    assert summary["trainable_params"] == record["params"]
    assert {layer.r for layer in lora_layers(cli.model).values()} == {record["rank"]}
