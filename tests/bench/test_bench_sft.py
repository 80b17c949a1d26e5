"""``lightning-sft bench sft``: the LoRA rank match, the flags it gives the main job, the size and apply-time
parts on real diffs (the fits themselves are whole main-job runs, minutes each, so they live behind the
command, not in CI)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_sft import LoRA, SparseFineTuning
from lightning_sft.adapters.injection import inject_lora
from lightning_sft.cli.bench import main, sparse_ft
from lightning_sft.sparse_ft.injection import inject_sparse_deltas
from lightning_sft.cli import SFTCLI
from lightning_sft.modules.causal_lm import build_model
from lightning_sft.sparse_ft import save_diff, sparse_delta_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lora_ranks_match_the_sparse_parameter_count_through_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    base = build_model(sparse_ft.BASE)
    target = sparse_ft.sparse_count(base, 0.01)
    rank, pattern, params = sparse_ft.matching_lora_ranks(base, target)
    assert abs(params / target - 1) < 0.01 and rank == 1 and pattern
    monkeypatch.setattr(sys, "argv", ["lightning-sft"])
    cli = SFTCLI(args=["--trainer.max_steps", "40", "--model.decay_steps", "40", *sparse_ft.lora_flags(rank, pattern)],
                 run=False)
    (lora,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LoRA)]
    inject_lora(cli.model, lora.config)
    assert sum(p.numel() for p in cli.model.parameters() if p.requires_grad) == params
    assert all(layer.alpha == 2 * layer.r for layer in cli.model.modules() if hasattr(layer, "lora_A"))

    cli = SFTCLI(args=["--trainer.max_steps", "40", "--model.decay_steps", "40",
                       *sparse_ft.sft_flags(0.01, "random", 0.02)], run=False)
    (sft,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SparseFineTuning)]
    assert (sft.density, sft.selection, cli.model.hparams.lr) == (0.01, "random", 0.02)
    assert not any(isinstance(cb, LoRA) for cb in cli.trainer.callbacks)
    inject_sparse_deltas(cli.model, sft.density, sft.selection)
    assert sum(p.numel() for p in cli.model.parameters() if p.requires_grad) == target


def test_benchmark_measures_the_diff_the_sparse_run_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_fit(flags: list[str], seed: int, steps: int, root: Path, threads: int | None) -> dict[str, Any]:
        root.mkdir(parents=True)
        summary = {"test_loss_after": 0.5, "test_acc_after": 0.3, "trainable_params": 44232, "mean_step_time_s": 0.2}
        if "--lora.r" in flags:
            (root / "adapter").mkdir()
            (root / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 200_000)
            return {**summary, "adapter": str(root / "adapter")}
        model = build_model(sparse_ft.BASE)
        inject_sparse_deltas(model, 0.01, "random")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in sparse_delta_layers(model).values():
                layer.delta_indices.copy_(torch.randperm(layer.base_layer.weight.numel(), generator=g)[: layer.count])
                layer.delta_values.copy_(torch.randn(layer.count, generator=g) * 0.01)
        return {**summary, "diff": str(save_diff(model, root / "diff.safetensors"))}

    monkeypatch.setattr(sparse_ft, "_fit", fake_fit)
    result = sparse_ft.benchmark(0.01, ["fisher", "random"], 0.03, 100, 0, 2, 64, 1, None)
    assert set(result["runs"]) == {"sft-fisher", "sft-random", "lora"}
    size = result["size"]
    assert size["nnz"] == result["sft_params"] == 44232 and size["ideal_bytes"] == 4 * 44232
    assert 1.0 < size["vs_ideal"] < 1.5 and size["meets_target"]  # small random deltas: few fixups
    assert size["vs_checkpoint"] < 0.02
    assert result["apply"]["shipped"]["restored_exactly"] and result["apply"]["larger"]["restored_exactly"]
    assert result["apply"]["larger"]["hidden"] == 64
    report = sparse_ft.format_report(result)
    assert "(target <= 1.5x: met)" in report and "restored exactly: yes" in report


@pytest.mark.parametrize("flags", [["--density", "0"], ["--selections", "magnitude"], ["--steps", "10"],
                                   ["--repeats", "0"]])
def test_rejects_bad_options(flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", *flags])
    assert exit_info.value.code == 2
