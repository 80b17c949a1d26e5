"""ContextualSparsity across a checkpoint resume and under 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from ddp_helpers import HELPERS, run_ddp_and_compare_adapters
from lightning_sft import ContextualSparsity, LoRA
from lightning_sft.data import RandomTokenData
from lightning_sft.modules import CausalLM


def _all_context(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


class _Probe(pl.Callback):
    """Records, for every forward of the network, the step it ran at, whether it trained and whether
    sparsity was on (as ``_Probe`` in test_contextual_sparsity, plus the step)."""

    def __init__(self, sparsity: ContextualSparsity) -> None:
        self.sparsity, self.calls = sparsity, []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.model.register_forward_pre_hook(
            lambda module, args: self.calls.append((trainer.global_step, module.training, self.sparsity.state.active))
        )


def _sparsity() -> ContextualSparsity:
    return ContextualSparsity("svd", 0.5, 0.5, dense_layers=(), dense_warmup=2, token_mask_fn=_all_context)


def _fit(root: Path, steps: int, seed: int, callbacks: list[pl.Callback], ckpt_path: Path | None = None) -> CausalLM:
    pl.seed_everything(seed)
    module = CausalLM(model="tiny-llama", lr=1e-2)
    checkpointing = any(isinstance(cb, pl.callbacks.ModelCheckpoint) for cb in callbacks)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", callbacks=callbacks, logger=False, default_root_dir=root,
                         enable_checkpointing=checkpointing, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    # 12 sequences in batches of 4: an epoch is 3 steps, so step 3 is an epoch boundary.
    data = RandomTokenData(seq_len=16, batch_size=4, num_train=12, num_val=4)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module




def _adapters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


# The resumed Trainer deliberately has no ModelCheckpoint (nothing to restore into it).
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_mid_run_equals_uninterrupted_run_and_keeps_warmup(tmp_path: Path, one_thread: None) -> None:
    # Resume at an epoch boundary (3 batches per epoch): Lightning checkpoints neither a plain
    # DataLoader's position nor the global RNG; LoRA has no dropout and the SVD estimator no RNG.
    sparsity = _sparsity()
    probe = _Probe(sparsity)
    straight = _adapters(_fit(tmp_path / "a", 6, 0, [LoRA(r=4), sparsity, probe]))
    assert [(step, active) for step, training, active in probe.calls if training] == [
        (0, False), (1, False), (2, True), (3, True), (4, True), (5, True)
    ]

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = _adapters(_fit(tmp_path / "b", 3, 0, [LoRA(r=4), _sparsity(), ckpt]))
    (path,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    assert "step=3" in path.name

    sparsity = _sparsity()
    probe = _Probe(sparsity)
    # A different seed: the base weights, LoRA A init and optimizer state must all come from the checkpoint.
    resumed = _adapters(_fit(tmp_path / "c", 6, 123, [LoRA(r=4), sparsity, probe], ckpt_path=path))
    # The warm-up is counted on trainer.global_step, which the checkpoint restores: steps 3-5 stay sparse.
    assert [(step, active) for step, training, active in probe.calls if training] == [
        (3, True), (4, True), (5, True)
    ]
    assert straight.keys() == resumed.keys() and len(straight) == 28
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0)
    assert any(not torch.equal(resumed[name], first[name]) for name in straight)


def test_two_process_ddp_runs_sparse_on_both_ranks_with_identical_adapters(tmp_path: Path) -> None:
    # Each rank picks its channels from its own micro-batch, so the forwards (and the local gradients)
    # differ between ranks; DDP all-reduces the gradients, so the adapters still agree bit for bit.
    run_ddp_and_compare_adapters(HELPERS / "ddp_sparsity_script.py", tmp_path, expected_tensors=28)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world_size"] == 2 and report["global_rank"] == rank
        assert report["sparse_steps"] == 3, report
        dense, sparse = report["skipped_flops"][:2], report["skipped_flops"][2:]
        assert dense == [0.0, 0.0] and len(sparse) == 3 and all(flops > 0 for flops in sparse), report
        assert 0 < report["sparsity_mean"] < 1, report
    # The ranks saw different micro-batches, hence (almost surely) different channel selections/skips,
    # but calibration sums its statistics over both: the same estimators and "auto" choice everywhere.
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["first_input_ids"] != reports[1]["first_input_ids"]
    assert reports[0]["auto_sparsity"] == reports[1]["auto_sparsity"] and len(reports[0]["auto_sparsity"]) == 2
    assert reports[0]["estimator_sums"] == reports[1]["estimator_sums"] and reports[0]["estimator_sums"]
