"""ContextualSparsity wired into the Trainer: token split, warm-up, dense eval, order, refusals."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_sft import ContextualSparsity, EfficiencyMonitor, LoRA
from lightning_sft.sparsity.context import context_mask_from_labels
from lightning_sft.data import RandomTokenData
from lightning_sft.modules import CausalLM
from lightning_sft.sparsity import sparse_blocks


def test_mask_keeps_positions_whose_prediction_is_scored_dense() -> None:
    labels = torch.tensor([[-100, -100, -100, 7, 8, 2, -100]])
    # Position 2 predicts the first answer token (label at 3), so it is dense; 5 predicts padding.
    assert context_mask_from_labels(labels).tolist() == [[True, True, False, False, False, True, True]]


def test_non_token_labels_name_token_mask_fn() -> None:
    with pytest.raises(ValueError, match="token_mask_fn"):
        context_mask_from_labels(torch.tensor([1, 0, 1]))


def test_padding_is_not_context() -> None:
    sparsity = ContextualSparsity()
    batch = {"labels": torch.tensor([[-100, -100, 5, 2, -100]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    assert sparsity._context_mask(batch).tolist() == [[True, False, False, True, False]]


def _all_context(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


class _Probe(pl.Callback):
    """Records, for every forward of the network, whether it trained and whether sparsity was on."""

    def __init__(self, sparsity: ContextualSparsity) -> None:
        self.sparsity, self.calls = sparsity, []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.model.register_forward_pre_hook(
            lambda module, args: self.calls.append((module.training, self.sparsity.state.active))
        )


def _fit(callbacks: list[pl.Callback], steps: int = 3, seed: int = 0) -> CausalLM:
    pl.seed_everything(seed)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         val_check_interval=steps, num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(module, datamodule=RandomTokenData(seq_len=16, batch_size=4, num_train=16, num_val=4))
    return module


def _adapters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_keep_all_equals_dense_and_real_sparsity_differs() -> None:
    dense = _adapters(_fit([LoRA(r=4)]))
    keep_all = _adapters(_fit([LoRA(r=4), ContextualSparsity("none", 0.5, 0.5, dense_layers=(), dense_warmup=0,
                                                             token_mask_fn=_all_context)]))
    sparse = _adapters(_fit([LoRA(r=4), ContextualSparsity("oracle", 0.5, 0.5, dense_layers=(), dense_warmup=0,
                                                           token_mask_fn=_all_context)]))
    assert dense and dense.keys() == keep_all.keys() == sparse.keys()
    for name in dense:
        # keep-all runs the gathered products (all indices), which round differently from the dense ones
        # (~1e-7 relative). Adam divides each gradient entry by its own size, so on entries whose sum nearly
        # cancels that relative error is large and moves the weight by up to lr times it: 3.5e-4 seen after
        # three steps at lr 1e-2. Real sparsity moves every adapter by more than 3e-2.
        torch.testing.assert_close(keep_all[name], dense[name], rtol=1e-5, atol=2e-3)
        assert not torch.allclose(sparse[name], dense[name], atol=1e-2), name


def test_callback_order_does_not_matter() -> None:
    def run(first_lora: bool) -> dict[str, torch.Tensor]:
        lora = LoRA(r=4)
        sparsity = ContextualSparsity("svd", 0.5, 0.5, dense_layers=(), dense_warmup=0, token_mask_fn=_all_context)
        return _adapters(_fit([lora, sparsity] if first_lora else [sparsity, lora]))

    a, b = run(True), run(False)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_warmup_and_validation_are_dense_and_flops_are_reported(tmp_path) -> None:
    sparsity = ContextualSparsity("svd", 0.5, dense_layers=(), dense_warmup=2, token_mask_fn=_all_context)
    probe = _Probe(sparsity)
    module = _fit([LoRA(r=4), sparsity, probe, EfficiencyMonitor()], steps=4)
    train = [active for training, active in probe.calls if training]
    evaluation = [active for training, active in probe.calls if not training]
    assert train == [False, False, True, True]
    assert evaluation and not any(evaluation)
    assert not sparse_blocks(module)  # desparsified after fit
    assert not any("forward" in m.__dict__ for m in module.modules())
    assert module.flops_per_batch > 0


def test_flops_ratio_below_one_with_sparsity() -> None:
    monitor = EfficiencyMonitor()
    sparsity = ContextualSparsity("svd", 0.5, 0.5, dense_layers=(), dense_warmup=0, token_mask_fn=_all_context)
    module = _fit([LoRA(r=4), sparsity, monitor], steps=2)
    totals = monitor.fit_totals
    assert totals["effective_flops"] < totals["dense_flops"]
    assert module.flops_per_batch < totals["dense_flops"] / totals["steps"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"strategy": "magic"}, ValueError, "valid: none, norm, oracle, random, svd"),
        ({"mlp_sparsity": 1.0}, ValueError, r"\[0, 1\)"),
        ({"attn_sparsity": -0.1}, ValueError, r"\[0, 1\)"),
        ({"mlp_sparsity": "llama9"}, ValueError, "not a preset"),
        ({"dense_warmup": 1.5}, ValueError, "dense_warmup"),
        ({"estimator_rank": 0}, ValueError, "estimator_rank"),
        ({"token_mask_fn": "labels"}, TypeError, "callable"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ContextualSparsity(**kwargs)


class _PlainModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_without_mlp_or_attention_is_refused_unchanged() -> None:
    module = _PlainModule()
    before = {n: p.clone() for n, p in module.state_dict().items()}
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", callbacks=[ContextualSparsity()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(TypeError, match="no recognisable MLP"):
        trainer.fit(module, torch.utils.data.DataLoader(torch.randn(4, 4), batch_size=2))
    assert all(torch.equal(module.state_dict()[n], t) for n, t in before.items())


def test_batches_without_labels_name_the_fix() -> None:
    with pytest.raises(ValueError, match="label_key=.*token_mask_fn"):
        _fit([LoRA(r=4), ContextualSparsity("svd", 0.5, dense_layers=(), dense_warmup=0, label_key="targets")])


def test_cli_flag_adds_the_callback(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from lightning_sft.cli import SFTCLI

    monkeypatch.setattr(sys, "argv", ["lightning-sft"])
    cli = SFTCLI(args=["--sparsity", "svd", "--trainer.default_root_dir", str(tmp_path)], run=False)
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ContextualSparsity)]
    assert callback.strategy == "svd"
    off = SFTCLI(args=["--trainer.default_root_dir", str(tmp_path)], run=False)
    assert not any(isinstance(cb, ContextualSparsity) for cb in off.trainer.callbacks)
