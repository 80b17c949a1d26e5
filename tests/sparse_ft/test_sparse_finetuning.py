"""SparseFineTuning: the sparse-delta layer, entry selection, drop-and-regrow, resume, DDP, the CLI flag."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_sft import ContextualSparsity, LoRA, SparseFineTuning
from lightning_sft.sparse_ft.injection import inject_sparse_deltas
from lightning_sft.cli import SFTCLI
from lightning_sft.data import RandomTokenData
from lightning_sft.modules import CausalLM
from lightning_sft.sparse_ft import SparseDeltaLinear, sparse_delta_layers
from lightning_sft.sparse_ft.selection import drop_and_regrow, entry_count, top_entries
import tiny_models
from ddp_helpers import HELPERS, run_ddp_and_compare_adapters
from tiny_fits import tiny_data, tiny_fit, tiny_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the sparse-delta layer ------------------------------------------------------------------------------


def _layer(base: nn.Module, count: int, seed: int = 0) -> SparseDeltaLinear:
    g = torch.Generator().manual_seed(seed)
    layer = SparseDeltaLinear(base, count, "random")
    layer.delta_indices.copy_(torch.randperm(base.weight.numel(), generator=g)[:count])
    with torch.no_grad():
        layer.delta_values.copy_(torch.randn(count, generator=g))
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_matches_a_dense_weight_trained_at_the_same_entries(kind: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    layer = _layer(base, 9)
    x = torch.randn(3, 5, 12, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)

    dense = base.weight.detach().clone().reshape(-1)
    dense[layer.delta_indices] += layer.delta_values.detach()
    dense = dense.view_as(base.weight).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = x_ref @ dense + base.bias if kind == "conv1d" else nn.functional.linear(x_ref, dense, base.bias)
    bias_grad = base.bias.grad.clone()  # a trainable bias still trains
    base.bias.grad = None
    ref.backward(grad)

    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.delta_values.grad, dense.grad.reshape(-1)[layer.delta_indices])
    torch.testing.assert_close(bias_grad, base.bias.grad)
    assert base.weight.grad is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref)


def test_layer_starts_as_an_exact_no_op_and_refuses_bad_counts() -> None:
    base = nn.Linear(8, 4)
    layer = SparseDeltaLinear(base, 3, "fisher")
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), base(x))
    for count in (0, 33):
        with pytest.raises(ValueError, match="count must be in"):
            SparseDeltaLinear(base, count, "fisher")
    with pytest.raises(TypeError, match="not a supported linear"):
        SparseDeltaLinear(nn.Embedding(4, 4), 1, "fisher")


def test_layer_runs_under_bf16_autocast_with_fp32_values() -> None:
    torch.manual_seed(0)
    layer = _layer(nn.Linear(16, 8), 10)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and layer.delta_values.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(out, nn.functional.linear(x, layer.tuned_weight(), layer.base_layer.bias))


# --- selection -------------------------------------------------------------------------------------------


def test_entry_count_and_top_entries() -> None:
    assert entry_count(1000, 0.01) == 10 and entry_count(10, 0.001) == 1 and entry_count(10, 1.0) == 10
    importance = torch.tensor([[0.1, 5.0, 0.2], [3.0, 0.0, 4.0]])
    assert top_entries(importance, 3).tolist() == [1, 3, 5]


def test_drop_and_regrow_replaces_the_smallest_deltas_with_the_best_new_entries() -> None:
    indices = torch.tensor([0, 2, 4, 6, 8])
    values = torch.tensor([0.5, -0.01, 0.3, 0.02, -0.9])
    importance = torch.arange(10, dtype=torch.float32)  # 9 is best, but 8 is trained already
    positions, new = drop_and_regrow(indices, values, importance, 0.4)
    assert sorted(positions.tolist()) == [1, 3]  # |-0.01| and |0.02|
    assert sorted(new.tolist()) == [7, 9]
    # Never more than the untrained entries, and nothing when the fraction rounds to zero.
    assert drop_and_regrow(indices // 2, values, torch.ones(6), 0.9)[0].numel() == 1
    assert drop_and_regrow(indices, values, importance, 0.05)[0].numel() == 0


# --- the callback ----------------------------------------------------------------------------------------


def _data() -> RandomTokenData:
    return tiny_data(32)  # 8 batches: enough for the default score_batches


def _fit(root: Path, steps: int, callbacks: list[pl.Callback], ckpt_path: Path | None = None) -> CausalLM:
    return tiny_fit(root, steps, callbacks, ckpt_path, num_train=32)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def test_only_the_selected_entries_change(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = tiny_trainer(tmp_path, 5, [SparseFineTuning(density=0.05)])
    trainer.fit(module, datamodule=_data())
    layers = sparse_delta_layers(module.model)
    assert len(layers) == 14  # every linear layer but the (tied) head
    for name, param in module.model.named_parameters():
        if name.endswith("delta_values"):
            continue
        # Base weights, norms and embeddings are untouched; the deltas live beside them.
        assert torch.equal(param, before[name.replace(".base_layer", "")]), name
    for name, layer in layers.items():
        base = layer.base_layer.weight
        changed = torch.nonzero((layer.tuned_weight() != base).reshape(-1)).reshape(-1)
        assert set(changed.tolist()) <= set(layer.delta_indices.tolist())
        assert changed.numel() > 0.9 * layer.count, name  # trained entries moved
        assert layer.count == entry_count(base.numel(), 0.05)


def test_trainable_state_and_optimizer_memory_scale_with_the_density(tmp_path: Path) -> None:
    state_bytes = {}
    for density in (0.01, 0.1):
        pl.seed_everything(0)
        module = CausalLM(model="tiny-llama", lr=1e-2)
        trainer = tiny_trainer(tmp_path, 2, [SparseFineTuning(density=density, selection="weight")])
        trainer.fit(module, datamodule=_data())
        count = sum(layer.count for layer in sparse_delta_layers(module).values())
        assert sum(p.numel() for p in module.parameters() if p.requires_grad) == count
        (optimizer,) = trainer.optimizers
        tensors = [t for s in optimizer.state.values() for t in s.values() if t.numel() > 1]
        assert sum(t.numel() for t in tensors) == 2 * count  # AdamW's two moments, for the k entries only
        state_bytes[density] = sum(t.numel() * t.element_size() for t in tensors)
    ratio = state_bytes[0.1] / state_bytes[0.01]
    assert 9 < ratio < 11


def _dense_grads(module: CausalLM, batches: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, list]:
    """Per-batch gradients of the plain model's weights: the reference the selection must agree with."""
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for param in module.parameters():
        param.requires_grad_(False)
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    weights = {name: module.model.get_submodule(name).weight for name in names}
    for weight in weights.values():
        weight.requires_grad_(True)
    for index, batch in enumerate(batches):
        module.training_step(batch, index).backward()
        for name, weight in weights.items():
            grads[name].append(weight.grad.clone())
            weight.grad = None
    return grads


@pytest.mark.parametrize("selection", ["fisher", "grad"])
def test_gradient_selections_pick_the_top_entries_of_the_accumulated_gradients(selection: str, tmp_path: Path) -> None:
    data = _data()
    data.setup("fit")
    batches = list(data.train_dataloader())[:3]
    pl.seed_everything(0)
    reference = CausalLM(model="tiny-llama", lr=1e-2)
    names = [n for n, m in reference.model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]

    sft = SparseFineTuning(density=0.03, selection=selection, score_batches=3)
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    # RandomTokenData does not shuffle, so the calibration reads the same first three batches.
    tiny_trainer(tmp_path, 1, [sft], max_epochs=1, limit_train_batches=0).fit(module, datamodule=data)
    grads = _dense_grads(reference, batches, names)
    layers = sparse_delta_layers(module.model)
    for name in names:
        stacked = torch.stack(grads[name])
        score = stacked.square().sum(0) if selection == "fisher" else stacked.sum(0).abs()
        expected = set(top_entries(score, layers[name].count).tolist())
        chosen = set(layers[name].delta_indices.tolist())
        assert len(chosen ^ expected) <= 2, name  # float summation order may swap a tie at the boundary


def test_scoring_leaves_no_trace_in_the_fit(tmp_path: Path) -> None:
    class _RngAtStart(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.state = torch.get_rng_state()

    states = []
    for selection in ("fisher", "weight"):  # the second scores nothing
        probe = _RngAtStart()
        module = _fit(tmp_path, 1, [SparseFineTuning(selection=selection, score_batches=2), probe])
        assert module.training and all(m.training for m in module.modules())
        states.append(probe.state)
    assert torch.equal(states[0], states[1])


def test_weight_and_random_selections(tmp_path: Path) -> None:
    module = _fit(tmp_path, 1, [SparseFineTuning(density=0.05, selection="weight")])
    for layer in sparse_delta_layers(module).values():
        expected = top_entries(layer.base_layer.weight.abs(), layer.count)
        assert torch.equal(layer.delta_indices, expected)
    picks = []
    for seed in (3, 3, 4):
        module = _fit(tmp_path, 1, [SparseFineTuning(density=0.05, selection="random", seed=seed)])
        picks.append({n: l.delta_indices.clone() for n, l in sparse_delta_layers(module).items()})
    assert all(torch.equal(picks[0][n], picks[1][n]) for n in picks[0])  # same seed, same entries
    assert not all(torch.equal(picks[0][n], picks[2][n]) for n in picks[0])
    layers = list(picks[0].values())
    assert not torch.equal(layers[0], layers[7])  # two same-shaped weights get different entries


def test_reselection_drops_the_smallest_deltas_and_resets_their_optimizer_state(tmp_path: Path) -> None:
    class _Snapshot(pl.Callback):
        """Indices and values after step 4's update, before the reselection (this callback runs first)."""

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
            if trainer.global_step == 4:
                self.before = {n: (l.delta_indices.clone(), l.delta_values.detach().clone())
                               for n, l in sparse_delta_layers(pl_module).items()}

    sft = SparseFineTuning(density=0.05, reselect_every=4, score_batches=2, regrow_fraction=0.25)
    snapshot = _Snapshot()
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    trainer = tiny_trainer(tmp_path, 4, [snapshot, sft])
    trainer.fit(module, datamodule=_data())
    assert float(trainer.callback_metrics["sparse_ft/regrown"]) > 0
    (optimizer,) = trainer.optimizers
    for name, layer in sparse_delta_layers(module).items():
        old_indices, old_values = snapshot.before[name]
        moved = torch.nonzero(layer.delta_indices != old_indices).reshape(-1)
        assert moved.numel() == round(0.25 * layer.count), name
        assert not set(layer.delta_indices[moved].tolist()) & set(old_indices.tolist())  # regrown entries are new
        kept = torch.ones(layer.count, dtype=torch.bool)
        kept[moved] = False
        assert old_values[moved].abs().max() <= old_values[kept].abs().min()  # the smallest deltas went
        assert layer.delta_values.detach()[moved].abs().max() == 0
        state = optimizer.state[layer.delta_values]
        assert state["exp_avg"][moved].abs().max() == 0 and state["exp_avg_sq"][moved].abs().max() == 0
        assert state["exp_avg_sq"][kept].abs().min() > 0


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    def sft() -> SparseFineTuning:
        return SparseFineTuning(density=0.05, reselect_every=5, score_batches=3, regrow_fraction=0.3)

    straight = _state(_fit(tmp_path / "a", 12, [sft()]))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    # 32 sequences in batches of 4: step 8 ends an epoch, where Lightning resumes the data order exactly.
    # Step 8 is inside the scoring window of the reselection at step 10, so the partial scores must resume too.
    _fit(tmp_path / "b", 8, [sft(), ckpt])
    (path,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    assert torch.load(path, weights_only=False)["callbacks"]["SparseFineTuning"]["scores"]
    resumed = _state(_fit(tmp_path / "c", 12, [sft()], ckpt_path=path))
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0)


def test_two_process_ddp_selects_and_trains_the_same_entries(tmp_path: Path) -> None:
    script = HELPERS / "ddp_sparse_finetuning_script.py"
    weights = run_ddp_and_compare_adapters(script, tmp_path, expected_tensors=28, trained_suffix="delta_values")
    assert sum(name.endswith("delta_indices") for name in weights) == 14


def test_a_second_fit_continues_from_the_trained_deltas(tmp_path: Path) -> None:
    module = _fit(tmp_path, 3, [SparseFineTuning(density=0.05)])
    trained = {n: (l.delta_indices.clone(), l.delta_values.detach().clone()) for n, l in sparse_delta_layers(module).items()}
    sft = SparseFineTuning(density=0.05)  # a new instance: it must not select again over the trained deltas
    tiny_trainer(tmp_path, 1, [sft]).fit(module, datamodule=_data())
    for name, layer in sparse_delta_layers(module).items():
        assert torch.equal(layer.delta_indices, trained[name][0])
        assert not torch.equal(layer.delta_values, trained[name][1])  # trained on from where it was
        assert (layer.delta_values - trained[name][1]).abs().max() < trained[name][1].abs().max()


def test_order_of_callbacks_does_not_matter(tmp_path: Path) -> None:
    class _Other(pl.Callback):
        pass

    first = _state(_fit(tmp_path, 3, [SparseFineTuning(density=0.05), _Other()]))
    second = _state(_fit(tmp_path, 3, [_Other(), SparseFineTuning(density=0.05)]))
    assert all(torch.equal(first[n], second[n]) for n in first)


# --- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": 0}, "density"),
        ({"density": 1.5}, "density"),
        ({"density": True}, "density"),
        ({"selection": "magnitude"}, "selection"),
        ({"selection": "weight", "reselect_every": 10}, "never change"),
        ({"reselect_every": 4, "score_batches": 8}, "score_batches"),
        ({"reselect_every": 0}, "reselect_every"),
        ({"regrow_fraction": 1.0}, "regrow_fraction"),
        ({"score_batches": 0}, "score_batches"),
        ({"seed": -1}, "seed"),
        ({"target_modules": "("}, "regular expression"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparseFineTuning(**kwargs)


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        ([SparseFineTuning(), LoRA(r=4)], "use one of the two"),
        ([SparseFineTuning(), ContextualSparsity()], "ContextualSparsity"),
        ([SparseFineTuning(), SparseFineTuning()], "more than one"),
        ([SparseFineTuning(target_modules=["nothing_like_this"])], "matches no linear layer"),
    ],
)
def test_conflicting_setups_are_refused_before_any_change(callbacks: list, match: str, tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama")
    before = _state(module)
    with pytest.raises((ValueError, RuntimeError), match=match):
        tiny_trainer(tmp_path, 1, callbacks).fit(module, datamodule=_data())
    after = _state(module)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert not sparse_delta_layers(module)


def test_tied_weights_are_refused_and_the_model_left_untouched() -> None:
    model = tiny_models.build("gpt2")  # lm_head shares the token embedding
    before = _state(model)
    with pytest.raises(ValueError, match="tied weights"):
        inject_sparse_deltas(model, 0.01, "weight", target_modules=["lm_head", "c_fc"])
    assert _state(model).keys() == before.keys() and not sparse_delta_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_every_family_gets_deltas_on_its_linear_layers() -> None:
    for family, expected in tiny_models.EXPECTED_ADAPTED.items():
        model = tiny_models.build(family)
        batch = tiny_models.batch()
        with torch.no_grad():
            reference = model(**batch)[0]
        names = inject_sparse_deltas(model, 0.05, "weight")
        assert len(names) == expected, family
        with torch.no_grad():
            torch.testing.assert_close(model(**batch)[0], reference, rtol=0, atol=0)  # zero deltas: a no-op


# --- the command line --------------------------------------------------------------------------------------


def test_sft_density_flag_replaces_lora(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-sft"])
    cli = SFTCLI(args=["--sft-density", "0.02", "--trainer.max_steps", "40", "--model.decay_steps", "40"], run=False)
    (sft,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SparseFineTuning)]
    assert sft.density == 0.02 and not any(isinstance(cb, LoRA) for cb in cli.trainer.callbacks)


@pytest.mark.parametrize("value", ["2", "none", "0"])
def test_sft_density_flag_rejects_bad_values(value: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-sft"])
    with pytest.raises(SystemExit):
        SFTCLI(args=["--sft-density", value], run=False)
    assert "sft-density" in capsys.readouterr().err
