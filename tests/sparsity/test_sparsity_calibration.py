"""Calibration from the dense warm-up: whitened SVD factors, the sensitivity measure, the FLOPs-budget
allocation, and the callback's ``mlp_sparsity="auto"`` / ``calibration_steps`` wiring."""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_sft import ContextualSparsity, LoRA
from lightning_sft.data import RandomTokenData
from lightning_sft.modules import CausalLM
from lightning_sft.anatomy import describe
from lightning_sft.sparsity import (
    SparseBlock,
    SparsityState,
    SVDEstimator,
    build_estimator,
    kept_channels,
    recall,
    sparse_blocks,
    sparsify,
    svd_factors,
    whitened_factors,
)
from lightning_sft.sparsity.calibration import (
    SPARSITY_GRID,
    InputStatistics,
    allocate_sparsity,
    mlp_errors,
    relative_errors,
)
from test_sparse_blocks import INTERMEDIATE, _model


def _gated_block(model: torch.nn.Module, layer: int = 0):
    """The estimator block (gate and up weights) of one LLaMA MLP, as ``describe`` finds it."""
    return describe(model).mlps[layer].estimator_blocks(model)["mlp"]


def _sparse_mlps(model: torch.nn.Module, state: SparsityState, strategy: str = "oracle") -> list[SparseBlock]:
    mlps = describe(model).mlps
    assert [b.name for b in mlps] == [f"model.layers.{i}.mlp" for i in range(2)]
    return sparsify(model, mlps, [0.5, 0.5], state, strategy)

# -- whitened factors --------------------------------------------------------------------------------


def _low_dim_inputs(n: int = 512, dim: int = 32, occupied: int = 6, seed: int = 0) -> torch.Tensor:
    """Inputs that occupy only ``occupied`` directions of a ``dim``-dimensional space (plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, occupied, generator=g))[0]
    return torch.randn(n, occupied, generator=g) @ basis.T * 3 + 0.01 * torch.randn(n, dim, generator=g)


def test_whitened_factors_fit_the_inputs_seen_better_than_the_weight_svd() -> None:
    x = _low_dim_inputs()
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    exact = x @ weight.T
    plain, fitted = svd_factors(weight, 4), whitened_factors(weight, x.T @ x, x.shape[0], 4)
    plain_error = (plain.project(x) - exact).norm() / exact.norm()
    fitted_error = (fitted.project(x) - exact).norm() / exact.norm()
    assert fitted_error < 0.6 * plain_error
    # At the rank the inputs occupy (6 directions), the whitened factors reproduce the products.
    full = whitened_factors(weight, x.T @ x, x.shape[0], 6)
    assert (full.project(x) - exact).norm() / exact.norm() < 0.01


def test_whitened_factors_refuse_bad_shapes() -> None:
    with pytest.raises(ValueError, match="gram must be"):
        whitened_factors(torch.randn(8, 4), torch.eye(5), 10, 2)
    with pytest.raises(ValueError, match="tokens must be"):
        whitened_factors(torch.randn(8, 4), torch.eye(4), 0, 2)


def test_calibrated_svd_estimator_lifecycle() -> None:
    block = _gated_block(_model(lora=False))
    estimator = build_estimator("svd", block, "mlp", rank=4, calibrated=True)
    x = torch.randn(2, 5, 32)
    with pytest.raises(RuntimeError, match="calibrate"):
        estimator.select(x, 8)
    rows = x.reshape(-1, 32)
    estimator.calibrate(rows.T @ rows, rows.shape[0])
    chosen = estimator.select(x, 8)
    assert chosen.shape == (8,)
    state = estimator.state_dict()
    assert sorted(state) == ["gate.A", "gate.B", "up.A", "up.B"]
    again = build_estimator("svd", block, "mlp", rank=4, calibrated=True)
    again.load_state_dict(state)
    assert torch.equal(again.select(x, 8), chosen)
    with pytest.raises(ValueError, match="do not fit"):
        again.load_state_dict({key: value[:, :1] if key.endswith("A") else value for key, value in state.items()})
    with pytest.raises(ValueError, match="keys"):
        again.load_state_dict({"gate.A": state["gate.A"]})
    with pytest.raises(ValueError, match="checkpoints, not in"):
        SVDEstimator(rank=4, cache="/tmp/unused", calibrated=True)
    # A weight-only estimator has nothing to checkpoint.
    assert build_estimator("svd", block, "mlp", rank=4).state_dict() == {}


def test_calibration_raises_recall_on_structured_inputs() -> None:
    """Inputs confined to a few directions: the calibrated estimator finds the oracle's channels."""
    block = _gated_block(_model(lora=False, seed=3))
    # Rank 4 covers the 4 directions the inputs occupy, but not the weights' top 4 of 32.
    train = _low_dim_inputs(512, occupied=4, seed=0)
    test = _low_dim_inputs(64, occupied=4, seed=0)[:, None, :].repeat(1, 4, 1)
    oracle = build_estimator("oracle", block)
    plain = build_estimator("svd", block, rank=4)
    fitted = build_estimator("svd", block, rank=4, calibrated=True)
    fitted.calibrate(train.T @ train, train.shape[0])
    k = kept_channels(INTERMEDIATE, 0.5)
    scores = {"plain": 0.0, "fitted": 0.0}
    for sample in test.split(8):
        truth = oracle.select(sample, k)
        scores["plain"] += recall(plain.select(sample, k), truth) / 8
        scores["fitted"] += recall(fitted.select(sample, k), truth) / 8
    assert scores["fitted"] > scores["plain"] + 0.1, scores
    assert scores["fitted"] > 0.9, scores


# -- statistics and sensitivity --------------------------------------------------------------------


def test_input_statistics_sum_context_rows_and_round_trip() -> None:
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, False, False, False], [True, False, True, True, False]])
    stats = InputStatistics(sample_rows=3, sample_batches=2)
    for _ in range(3):
        stats.update(x, mask)
    rows = x[mask]
    torch.testing.assert_close(stats.gram, 3 * rows.T @ rows)
    assert stats.tokens == 15 and len(stats.samples) == 2
    pooled, sample = stats.samples[-1]
    torch.testing.assert_close(pooled, torch.stack([x[0, :2].mean(0), x[1, [0, 2, 3]].mean(0)]))
    assert sample.shape == (3, 8)
    assert all(any(torch.equal(row, r) for r in rows) for row in sample)
    copy = InputStatistics(sample_rows=3, sample_batches=2)
    copy.load_state_dict(stats.state_dict())
    stats.update(x, mask)
    copy.update(x, mask)
    torch.testing.assert_close(copy.gram, stats.gram)
    assert torch.equal(copy.samples[-1][1], stats.samples[-1][1])  # same generator state, same draw


def test_dropped_output_is_what_running_sparse_loses() -> None:
    """The dense MLP minus the MLP run sparse on ``idx`` (the real sparse forward, LoRA included)."""
    model = _model(lora=True)
    state = SparsityState()
    block = _sparse_mlps(model, state)[1]
    assert block.intermediate == INTERMEDIATE and block.keep == {"mlp": INTERMEDIATE // 2}
    rows = torch.randn(7, 32)
    idx = torch.tensor([0, 3, 5, 9, 20, 33, 40, 63])
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        dense = mlp(rows[None])  # inactive: the module's own forward
        block.estimator.select = lambda *args, **kwargs: idx
        block.keep = {"mlp": idx.numel()}
        state.active, state.context_mask = True, torch.ones(1, 7, dtype=torch.bool)
        sparse = mlp(rows[None])
    assert state.layer_sparsity == {block.name: 1 - idx.numel() / INTERMEDIATE}
    torch.testing.assert_close(block.dropped_output(rows, idx), (dense - sparse)[0], atol=1e-5, rtol=1e-5)


def test_mlp_errors_fall_with_sparsity_and_normalise_by_the_residual() -> None:
    model = _model(lora=False)
    wrapper = _sparse_mlps(model, SparsityState())[0]
    stats = InputStatistics()
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    stats.update(x, mask)
    stats.update_residual(2 * x, mask)
    sums = mlp_errors(wrapper, stats)
    assert sums.shape == (len(SPARSITY_GRID) + 1,) and sums[-1] == 12
    assert sums[0] == 0 and bool((sums[1:-1].diff() >= 0).all())  # more dropped channels, more error
    errors = relative_errors(sums, stats.residual_sq, stats.residual_tokens)
    torch.testing.assert_close(errors, sums[:-1] / 12 / ((2 * x).square().sum().double() / 12))


# -- allocation --------------------------------------------------------------------------------------


def _brute_force(errors: torch.Tensor, budget: float, grid: tuple[float, ...]) -> float:
    best = float("inf")
    for combo in itertools.product(range(len(grid)), repeat=errors.shape[0]):
        if sum(1 - grid[g] for g in combo) <= budget * errors.shape[0] + 1e-9:
            best = min(best, sum(float(errors[layer, g]) for layer, g in enumerate(combo)))
    return best


def test_allocation_is_optimal_under_the_budget() -> None:
    grid = (0.0, 0.5, 0.75, 0.9)
    g = torch.Generator().manual_seed(0)
    for budget in (0.3, 0.5, 0.8):
        errors = torch.rand(4, len(grid), generator=g).cumsum(dim=1) - torch.rand(4, 1, generator=g)
        errors[:, 0] = 0.0
        picked = allocate_sparsity(errors, budget, grid)
        assert sum(1 - s for s in picked) <= budget * 4 + 1e-9
        total = sum(float(errors[layer, grid.index(s)]) for layer, s in enumerate(picked))
        assert total == pytest.approx(_brute_force(errors, budget, grid))


def test_tolerant_layers_get_sparser() -> None:
    # Error grows with sparsity, 10x more steeply in layer 0 than in layer 3.
    slope = torch.tensor([10.0, 3.0, 1.0, 1.0])[:, None]
    errors = slope * torch.tensor(SPARSITY_GRID)[None, :] ** 2
    picked = allocate_sparsity(errors, 0.5)
    assert picked[0] < picked[1] < picked[3] and sum(1 - s for s in picked) <= 2.0 + 1e-9


def test_allocation_refuses_an_unreachable_budget() -> None:
    with pytest.raises(ValueError, match="below what the sparsest setting"):
        allocate_sparsity(torch.zeros(3, len(SPARSITY_GRID)), 0.005)
    with pytest.raises(ValueError, match="errors must be"):
        allocate_sparsity(torch.zeros(3, 2), 0.5)


# -- the callback ------------------------------------------------------------------------------------


def _all_context(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


def _fit(
    sparsity: ContextualSparsity, steps: int = 6, root: Path | None = None, ckpt_path: Path | None = None,
    extra: list[pl.Callback] | None = None, seed: int = 0,
) -> tuple[CausalLM, pl.Trainer]:
    pl.seed_everything(seed)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    callbacks = [LoRA(r=4), sparsity, *(extra or [])]
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", callbacks=callbacks, logger=False,
                         enable_checkpointing=any(isinstance(cb, pl.callbacks.ModelCheckpoint) for cb in callbacks),
                         default_root_dir=root, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=RandomTokenData(seq_len=16, batch_size=4, num_train=12, num_val=4), ckpt_path=ckpt_path)
    return module, trainer


class _Spy(pl.Callback):
    """Per training batch: whether the sparsity callback observed, ran sparse, and the MLP keeps."""

    def __init__(self, sparsity: ContextualSparsity) -> None:
        self.sparsity, self.steps, self.checkpoint_state = sparsity, [], {}

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        keeps = {b.name: (b.keep["mlp"], b.intermediate) for b in sparse_blocks(pl_module) if b.anatomy.kind == "mlp"}
        self.steps.append((trainer.global_step, self.sparsity.state.observing, self.sparsity.state.active, keeps))
        self.checkpoint_state = self.sparsity.state_dict()


def test_auto_calibrates_in_the_last_warmup_steps_and_meets_the_budget() -> None:
    sparsity = ContextualSparsity("svd", "auto", dense_layers=(), dense_warmup=3, calibration_steps=2,
                                  flops_budget=0.4, token_mask_fn=_all_context)
    spy = _Spy(sparsity)
    _fit(sparsity, extra=[spy])
    assert [(step, observing, active) for step, observing, active, _ in spy.steps] == [
        (0, False, False), (1, True, False), (2, True, False), (3, False, True), (4, False, True), (5, False, True)
    ]
    choice = sparsity.auto_sparsity
    assert len(choice) == 2 and set(choice.values()) <= set(SPARSITY_GRID)
    assert sum(1 - s for s in choice.values()) <= 0.4 * 2 + 1e-9
    sparse_keeps = spy.steps[-1][3]
    assert {name: keep for name, (keep, _) in sparse_keeps.items()} == {
        name: kept_channels(sparse_keeps[name][1], s) for name, s in choice.items() if s > 0
    }
    assert sparsity.state.statistics == {}  # freed after calibration


def test_calibrated_factors_and_auto_choice_are_checkpointed(tmp_path: Path) -> None:
    """A resume in the middle of the calibration steps and one after it both equal the straight run."""
    def make() -> ContextualSparsity:
        return ContextualSparsity("svd", "auto", dense_layers=(), dense_warmup=4, calibration_steps=3,
                                  token_mask_fn=_all_context)

    straight, _ = _fit(make(), steps=6)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _fit(make(), steps=6, root=tmp_path / "a", extra=[ckpt])
    paths = {p.name: p for p in (tmp_path / "ckpt").glob("*.ckpt")}
    mid = next(p for name, p in paths.items() if "step=3" in name)  # steps 1-2 observed, 3 to come
    after = next(p for name, p in paths.items() if "step=6" in name)
    state = torch.load(mid, weights_only=False)["callbacks"]
    assert "statistics" in next(v for k, v in state.items() if "ContextualSparsity" in k)
    adapters = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    resumed, _ = _fit(make(), steps=6, root=tmp_path / "b", ckpt_path=mid, seed=7)
    for name, value in resumed.named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(value, adapters[name], rtol=0, atol=0)
    sparsity = make()
    _fit(sparsity, steps=6, root=tmp_path / "c", ckpt_path=after, seed=7)
    assert sparsity.auto_sparsity and all(s in SPARSITY_GRID for s in sparsity.auto_sparsity.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mlp_sparsity": "auto", "calibration_steps": 0}, "calibration_steps >= 1"),
        ({"mlp_sparsity": "auto", "flops_budget": 0.0}, r"\[0.01, 1\]"),
        ({"mlp_sparsity": "auto", "flops_budget": "half"}, "must be a number"),
        ({"mlp_sparsity": 0.5, "flops_budget": 0.5}, "applies to mlp_sparsity='auto' only"),
        ({"attn_sparsity": "auto"}, "not a preset"),
        ({"cache_dir": "/tmp/x"}, "calibration_steps=0"),
        ({"calibration_steps": -1}, "calibration_steps"),
    ],
)
def test_bad_calibration_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ContextualSparsity(**kwargs)


def test_auto_without_warmup_is_refused_before_the_model_changes() -> None:
    sparsity = ContextualSparsity("svd", "auto", dense_layers=(), dense_warmup=0, token_mask_fn=_all_context)
    pl.seed_everything(0)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", callbacks=[LoRA(r=4), sparsity], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="dense warm-up, which is 0 steps"):
        trainer.fit(module, datamodule=RandomTokenData(seq_len=16, batch_size=4, num_train=8, num_val=4))
    assert not sparse_blocks(module) and not any("forward" in m.__dict__ for m in module.modules())


def test_calibration_zero_keeps_weight_only_factors() -> None:
    sparsity = ContextualSparsity("svd", 0.5, dense_layers=(), dense_warmup=2, calibration_steps=0,
                                  token_mask_fn=_all_context)
    spy = _Spy(sparsity)
    _fit(sparsity, steps=4, extra=[spy])
    assert not any(observing for _, observing, _, _ in spy.steps)
    assert spy.checkpoint_state["estimators"] == {"model.model.layers.0.mlp": {}, "model.model.layers.1.mlp": {}}
