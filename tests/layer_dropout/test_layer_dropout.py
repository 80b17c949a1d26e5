"""LayerDropout: schedules, the bandit, block discovery, the dropper and the callback in a Trainer."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_sft import EfficiencyMonitor, LayerDropout, LoRA
from lightning_sft.adapters.injection import LoRAConfig, inject_lora
from lightning_sft.cli import SFTCLI
from lightning_sft.layer_dropout.bandit import DiscountedUCB, validate_arms
from lightning_sft.layer_dropout.dropper import LayerDropper
from lightning_sft.layer_dropout.schedules import (
    drop_probabilities,
    expected_drop_fraction,
    rate_at,
)
from lightning_sft.anatomy.stacks import attention_width, block_step_flops, find_stacks
from lightning_sft.modules import CausalLM
import tiny_models
from ddp_helpers import HELPERS, run_ddp_and_compare_adapters
from tiny_fits import tiny_data, tiny_fit, tiny_trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.py


# --- schedules --------------------------------------------------------------------------------------------


def test_schedules_spread_the_rate_over_depth_and_protect_the_ends() -> None:
    uniform = drop_probabilities("uniform", 0.3, 6, 1, 1)
    assert uniform == pytest.approx([0, 0.3, 0.3, 0.3, 0.3, 0])
    linear = drop_probabilities("linear", 0.3, 6, 1, 1)  # proportional to (l + 1) / L
    assert linear == pytest.approx([0, 2 * 0.3 * 4 / 14, 3 * 0.3 * 4 / 14, 4 * 0.3 * 4 / 14, 5 * 0.3 * 4 / 14, 0])
    exponential = drop_probabilities("exponential", 0.3, 6, 0, 0)
    weights = [math.exp(l * math.log(2) / 5) - 1 for l in range(6)]
    assert exponential == pytest.approx([w * 0.3 * 6 / sum(weights) for w in weights])
    assert exponential[0] == 0 and all(a < b for a, b in zip(exponential, exponential[1:]))
    for probabilities in (uniform[1:-1], linear[1:-1], exponential):  # the droppable blocks average the rate
        assert sum(probabilities) / len(probabilities) == pytest.approx(0.3)
    assert expected_drop_fraction([uniform]) == pytest.approx(0.3 * 4 / 6)


def test_progressive_schedule_ramps_the_rate_in_over_steps() -> None:
    assert rate_at("progressive", 0.4, 0, 0.01) == 0
    assert rate_at("progressive", 0.4, 100, 0.01) == pytest.approx(0.4 * (1 - math.exp(-1)))
    assert rate_at("progressive", 0.4, 10_000, 0.01) == pytest.approx(0.4)
    assert rate_at("uniform", 0.4, 0, 0.01) == 0.4
    assert drop_probabilities("progressive", 0.2, 4, 0, 0) == drop_probabilities("linear", 0.2, 4, 0, 0)


def test_infeasible_rates_and_protection_are_refused_with_the_limit() -> None:
    with pytest.raises(ValueError, match=r"Use rate <= 0\.5"):  # linear over 4: the top block needs 2x the mean
        drop_probabilities("linear", 0.6, 4, 0, 0)
    with pytest.raises(ValueError, match="protects all of them"):
        drop_probabilities("uniform", 0.2, 2, 1, 1)


# --- the bandit -------------------------------------------------------------------------------------------


def test_bandit_finds_the_best_arm_on_a_noisy_synthetic_reward() -> None:
    means = [0.2, 0.5, 0.9, 0.4]
    rng = random.Random(0)
    bandit = DiscountedUCB(len(means), discount=1.0, exploration=0.5)
    for _ in range(300):
        arm = bandit.select()
        bandit.update(arm, rng.gauss(means[arm], 0.3))
    assert bandit.pulls[:4] == bandit.pulls and sum(bandit.pulls) == 300
    assert max(range(4), key=lambda i: bandit.pulls[i]) == 2 and bandit.pulls[2] > 200


def test_discounting_follows_a_reward_that_drifts() -> None:
    """The arm that is best early loses later; with forgetting the bandit switches, without it it sticks."""
    def run(discount: float) -> list[int]:
        bandit, rng, late = DiscountedUCB(2, discount=discount, exploration=0.5), random.Random(1), []
        for t in range(400):
            arm = bandit.select()
            means = (1.0, 0.2) if t < 200 else (0.0, 0.3)
            bandit.update(arm, rng.gauss(means[arm], 0.05))
            late.append(arm) if t >= 300 else None
        return late

    assert sum(run(0.9)) > 60  # arm 1 most of the last 100 decisions
    assert sum(run(1.0)) < 40


def test_bandit_state_round_trips_and_bad_arguments_are_refused() -> None:
    bandit = DiscountedUCB(3)
    for arm, reward in ((0, 1.0), (1, 2.0), (2, 0.5), (1, 1.5)):
        bandit.update(arm, reward)
    copy = DiscountedUCB(3)
    copy.load_state_dict(bandit.state_dict())
    assert copy.select() == bandit.select() and copy.indices() == bandit.indices()
    with pytest.raises(ValueError, match="this one 2"):
        DiscountedUCB(2).load_state_dict(bandit.state_dict())
    with pytest.raises(ValueError, match="discount"):
        DiscountedUCB(2, discount=0)
    with pytest.raises(ValueError, match="finite"):
        bandit.update(0, float("nan"))
    with pytest.raises(ValueError, match="at least two"):
        validate_arms((0.2,))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        validate_arms((0.0, 1.0))


# --- stacks and FLOPs -------------------------------------------------------------------------------------


class _Residual(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, width)) for _ in range(2))  # nested: not a stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x).relu() + sum(expert(x) for expert in self.experts)


class _Plain(nn.Module):
    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Residual() for _ in range(depth))
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(2))  # leaves: not a stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize(
    ("family", "path"), [("llama", "model.layers"), ("gpt2", "transformer.h"), ("bert", "encoder.layer")]
)
def test_stacks_are_found_by_structure(family: str, path: str) -> None:
    model = tiny_models.build(family)
    assert [name for name, _ in find_stacks(model)] == [path]
    assert attention_width(find_stacks(model)[0][1][0]) == 32


def test_plain_stacks_leave_nested_and_leaf_lists_out_and_bad_paths_are_refused() -> None:
    assert [name for name, _ in find_stacks(_Plain())] == ["blocks"]
    with pytest.raises(ValueError, match="found stacks: blocks"):
        find_stacks(_Plain(), ["blocks.0"])
    with pytest.raises(TypeError, match="no stack of blocks"):
        find_stacks(nn.Sequential(nn.Linear(2, 2)))


def _step_flops(model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    with FlopCounterMode(display=False) as counter:
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("lora", [False, True])
def test_reported_flops_of_a_skipped_block_match_the_flop_counter(family: str, lora: bool) -> None:
    model = tiny_models.build(family).train()
    if lora:
        inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"), torch.Generator().manual_seed(0))
    inputs = tiny_models.batch(size=3, length=16)
    stack = find_stacks(model)[0][1]
    reported: list[float] = []
    dropper = LayerDropper([("b0", stack[0]), ("b1", stack[1])], on_skip=reported.append)
    dropper.install()
    dense = _step_flops(model, inputs)
    dropper.dropped = {1}
    skipped = _step_flops(model, inputs)
    assert reported == [pytest.approx(block_step_flops(stack[1], 3, 16))]
    # The estimate counts attention as 12 T^2 d per sequence; on CPU the counter sees no FLOPs in the fused
    # SDPA kernel, so the two differ by about that term (~11% of a block here).
    assert reported[0] == pytest.approx(dense - skipped, rel=0.12)


# --- the dropper ------------------------------------------------------------------------------------------


def _llama_with_dropper(per_sample: bool = False) -> tuple[nn.Module, LayerDropper]:
    model = tiny_models.build("llama").train()
    blocks = [(f"model.layers.{i}", block) for i, block in enumerate(model.model.layers)]
    dropper = LayerDropper(blocks)
    dropper.install()
    return model, dropper


def test_a_dropped_block_is_the_identity_stores_nothing_and_gets_no_gradient() -> None:
    model, dropper = _llama_with_dropper()
    inputs = tiny_models.batch(size=2, length=12)
    model(**inputs)  # the first dense call records each block's output format
    dropper.dropped = {1}
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    hidden = model.model.embed_tokens(inputs["input_ids"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.model.layers[1](hidden, attention_mask=None, position_embeddings=None)
    assert out is hidden and saved == []

    reference = tiny_models.build("llama").train()
    del reference.model.layers[1]
    reference.config.num_hidden_layers = 1
    got = model(**inputs, labels=inputs["input_ids"])
    expected = reference(**inputs, labels=inputs["input_ids"])
    torch.testing.assert_close(got.logits, expected.logits)
    got.loss.backward()
    assert all(p.grad is None for p in model.model.layers[1].parameters())
    assert all(p.grad is not None for p in model.model.layers[0].parameters())


def test_eval_and_no_grad_are_dense_whatever_the_plan() -> None:
    model, dropper = _llama_with_dropper()
    inputs = tiny_models.batch()
    dense = model(**inputs).logits.detach()
    dropper.dropped = {0, 1}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, dense)
    model.eval()
    torch.testing.assert_close(model(**inputs).logits, dense)
    dropper.remove()
    assert "forward" not in vars(model.model.layers[0])


def test_ghost_gives_every_trainable_parameter_a_zero_gradient() -> None:
    model, dropper = _llama_with_dropper()
    inputs = tiny_models.batch()
    model(**inputs)
    dropper.ghost = True
    dropper.dropped = {1}
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = [p.grad for p in model.model.layers[1].parameters()]
    assert all(g is not None and not g.any() for g in grads)


def test_per_sample_dropping_runs_the_block_on_the_kept_rows_only() -> None:
    model, dropper = _llama_with_dropper()
    inputs = tiny_models.batch(size=6, length=10)
    model(**inputs)
    generator = torch.Generator().manual_seed(3)
    dropper.plan_samples([0.0, 0.5], generator)
    got = model(**inputs).logits
    kept = (dropper.row_draws[1] >= 0.5).nonzero().flatten()
    assert 0 < kept.numel() < 6 and dropper.dropped_fraction() == pytest.approx((6 - kept.numel()) / 12)
    dropper.clear()
    dense = model(**inputs).logits
    torch.testing.assert_close(got[kept], dense[kept], rtol=1e-5, atol=1e-5)  # kept rows: the full block
    dropper.dropped = {1}
    skipped = model(**inputs).logits
    dropped = [i for i in range(6) if i not in kept.tolist()]
    torch.testing.assert_close(got[dropped], skipped[dropped], rtol=1e-5, atol=1e-5)  # dropped rows: identity


def test_a_block_that_changes_the_shape_is_refused() -> None:
    stack = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)) for _ in range(2))
    dropper = LayerDropper([("s.0", stack[0]), ("s.1", stack[1])])
    dropper.install()
    with pytest.raises(TypeError, match="only residual"):
        stack[0](torch.randn(2, 4))


# --- the callback -----------------------------------------------------------------------------------------


class _Record(pl.Callback):
    """The blocks dropped at every training step."""

    def __init__(self) -> None:
        self.dropped: list[set[int]] = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        dropout = next(cb for cb in trainer.callbacks if isinstance(cb, LayerDropout))
        self.dropped.append(set(dropout.dropper.dropped))


def _trained(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_fit_drops_blocks_reports_skipped_flops_and_validates_dense(tmp_path: Path) -> None:
    record = _Record()
    monitor = EfficiencyMonitor()
    dropout = LayerDropout(rate=0.5, protect_first=0, protect_last=0, seed=1)
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    trainer = tiny_trainer(tmp_path, 12, [LoRA(r=4), dropout, record, monitor], limit_val_batches=2, val_check_interval=6)
    trainer.fit(module, datamodule=tiny_data())
    assert record.dropped[0] == set()  # the first step is dense: it records the blocks' output format
    counts = [len(d) for d in record.dropped[1:]]
    assert 0 < sum(counts) < 2 * len(counts)
    assert monitor.fit_totals["effective_flops"] < monitor.fit_totals["dense_flops"]
    assert "forward" not in vars(module.model.model.layers[0])  # teardown put the forwards back
    # The fit's last validation (after step 12) ran dense: a plain evaluation of the weights agrees.
    (result,) = tiny_trainer(tmp_path, 1, [], limit_val_batches=2).validate(module, datamodule=tiny_data(), verbose=False)
    assert result["val_loss"] == pytest.approx(float(trainer.callback_metrics["val_loss"]), rel=1e-6)


def test_callback_order_does_not_matter(tmp_path: Path) -> None:
    def run(order: int) -> dict[str, torch.Tensor]:
        callbacks = [LoRA(r=4, dropout=0.1), LayerDropout(rate=0.5, protect_first=0, protect_last=0)]
        return _trained(tiny_fit(tmp_path / str(order), 5, callbacks[::order]))

    first, second = run(1), run(-1)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("rate", [0.5, "auto"])
def test_resume_reproduces_the_uninterrupted_run(rate: float | str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bandit's reward divides by wall-clock seconds: a clock that ticks one second per call makes it
    # deterministic, so the resumed run must make the same decisions.
    ticks = iter(range(10**6))
    monkeypatch.setattr("lightning_sft.callbacks.layer_dropout.time.perf_counter", lambda: float(next(ticks)))

    def dropout() -> LayerDropout:
        return LayerDropout(rate=rate, protect_first=0, protect_last=0, decide_every=2, probe_batches=1,
                            arms=(0.0, 0.3, 0.6))

    straight_dropout = dropout()
    straight = _trained(tiny_fit(tmp_path / "a", 9, [LoRA(r=4), straight_dropout], limit_val_batches=1))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    # 24 sequences in batches of 4: step 6 ends an epoch, where Lightning resumes the data order exactly.
    tiny_fit(tmp_path / "b", 6, [LoRA(r=4), dropout(), ckpt], limit_val_batches=1)
    (path,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    resumed_dropout = dropout()
    resumed = _trained(tiny_fit(tmp_path / "c", 9, [LoRA(r=4), resumed_dropout], ckpt_path=path, limit_val_batches=1))
    assert resumed_dropout.batches_seen == straight_dropout.batches_seen == 9
    if rate == "auto":
        assert [d["rate"] for d in resumed_dropout.decisions] == [d["rate"] for d in straight_dropout.decisions]
        assert len(straight_dropout.decisions) == 4
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0)


def test_auto_tries_every_arm_then_logs_its_statistics(tmp_path: Path) -> None:
    dropout = LayerDropout(rate="auto", protect_first=0, protect_last=0, decide_every=2, probe_batches=1,
                           arms=(0.0, 0.25, 0.5))
    trainer = tiny_trainer(tmp_path, 8, [LoRA(r=4), dropout], limit_val_batches=1)
    pl.seed_everything(0)
    trainer.fit(CausalLM(model="tiny-llama", lr=1e-2), datamodule=tiny_data())
    assert [d["rate"] for d in dropout.decisions[:3]] == [0.0, 0.25, 0.5]
    assert sum(dropout.bandit.pulls) == len(dropout.decisions) == 4
    assert {"layer_dropout/reward", "layer_dropout/probe_loss", "layer_dropout/arm_0_mean_reward"} <= set(
        trainer.callback_metrics
    )


def test_two_process_ddp_with_default_settings_drops_the_same_blocks(tmp_path: Path) -> None:
    script = HELPERS / "ddp_layer_dropout_script.py"
    run_ddp_and_compare_adapters(script, tmp_path, expected_tensors=28)
    drops = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert drops[0] == drops[1] and "1" in drops[0]


# --- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 1.0}, r"\[0, 1\)"),
        ({"rate": -0.1}, r"\[0, 1\)"),
        ({"rate": "fast"}, r"\[0, 1\)"),
        ({"schedule": "cosine"}, "Unknown layer-dropout schedule"),
        ({"protect_first": -1}, "protect_first"),
        ({"per_sample": 1}, "per_sample"),
        ({"blocks": "model.layers"}, "dotted module paths"),
        ({"gamma": 0}, "gamma"),
        ({"rate": "auto", "arms": (0.1,)}, "at least two"),
        ({"rate": "auto", "decide_every": 0}, "decide_every"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerDropout(**kwargs)


@pytest.mark.parametrize(
    ("dropout", "match"),
    [
        (LayerDropout(rate=0.2), "protects all of them"),  # tiny-llama has 2 blocks, 1 + 1 protected
        (LayerDropout(rate=0.8, schedule="linear", protect_first=0, protect_last=0), "Use rate <= "),
        (LayerDropout(rate=0.2, blocks=["model.layers"]), "not an nn.ModuleList"),
        (LayerDropout(rate="auto", protect_first=0, protect_last=0), "val_dataloader"),
    ],
)
def test_bad_setups_are_refused_before_training(dropout: LayerDropout, match: str, tmp_path: Path) -> None:
    module = CausalLM(model="tiny-llama")
    before = {n: p.clone() for n, p in module.named_parameters()}
    data = tiny_data()
    data.setup("fit")
    with pytest.raises((ValueError, TypeError), match=match):  # no validation data: nothing for 'auto' to probe
        tiny_trainer(tmp_path, 2, [dropout]).fit(module, train_dataloaders=data.train_dataloader())
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters())
    assert not any("forward" in vars(layer) for layer in module.model.model.layers)


# --- the command line --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "rate"), [("0.3", 0.3), ("auto", "auto")])
def test_layer_dropout_flag_adds_the_callback(value: str, rate: float | str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-sft"])
    cli = SFTCLI(args=["--layer-dropout", value, "--trainer.max_steps", "40", "--model.decay_steps", "40"], run=False)
    (dropout,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LayerDropout)]
    assert (dropout.auto if rate == "auto" else dropout.rate == rate)
    off = SFTCLI(args=["--trainer.max_steps", "40", "--model.decay_steps", "40"], run=False)
    assert not [cb for cb in off.trainer.callbacks if isinstance(cb, LayerDropout)]


@pytest.mark.parametrize("value", ["1.0", "-0.2", "fast"])
def test_bad_layer_dropout_flag_is_a_usage_error(value: str, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-sft"])
    with pytest.raises(SystemExit) as exit_info:
        SFTCLI(args=["fit", "--layer-dropout", value])
    assert exit_info.value.code == 2 and "--layer-dropout" in capsys.readouterr().err
