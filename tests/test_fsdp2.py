"""Every callback under 2-process CPU (gloo) FSDP2 (``strategy="fsdp2"``): equal to one process or to
DDP, checkpoints that resume bit for bit, whole-tensor adapters and diffs, and the refusals.

One launch of ``sharded_cases.py`` runs every case (a fit of a few steps each); the tests read its files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from safetensors.torch import load_file

import sharded_cases as cases  # noqa: E402
from ddp_helpers import HELPERS  # noqa: E402

from lightning_sft import (  # noqa: E402
    AdaptiveRankSearch,
    ContextualSparsity,
    EightBitOptimizer,
    LoRA,
    SparseFineTuning,
    apply_diff,
    lora_layers,
    read_diff,
)
from lightning_sft.sparse_ft import sparse_delta_layers  # noqa: E402
from lightning_sft.strategies import FSDP2Strategy  # noqa: E402

# FSDP2 and DDP on 2 processes compute the same sums (a sum of two terms has one order): bit for bit.
EXACT = dict(rtol=0, atol=0)
# One process sums the batch of 8 in another order than two of 4 (fp32 rounding, ~1e-7 relative). The
# losses agree to that; the weights less, as Adam divides each gradient entry by its own size, so a nearly
# cancelling entry's large relative error moves its weight by up to lr (1e-2) times it: 1e-5 seen after four
# steps. Both stay far below what a wrong shard, a missing reduction or a wrong channel gives (> 1e-3).
LOSS_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
TENSOR_TOLERANCE = dict(rtol=1e-4, atol=1e-4)
# QLoRA dequantizes the 4-bit base in each product; Adam's first steps turn its rounding differences in
# near-zero gradients into updates of a few 1e-6.
QLORA_TOLERANCE = dict(rtol=1e-3, atol=2e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    script = HELPERS / "sharded_cases.py"
    result = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out


def _result(runs: Path, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors = load_file(runs / f"{key}.safetensors") if (runs / f"{key}.safetensors").exists() else {}
    return json.loads((runs / f"{key}.json").read_text()), tensors


def _one_process(callbacks: list[pl.Callback]) -> tuple[cases.UserModule, list[float]]:
    """The same fit on one process, each step's batch the two ranks' batches together."""
    module, losses = cases.UserModule(), cases.StepLosses()
    pl.seed_everything(0)  # as the launched processes re-seed at fit start
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=cases.STEPS, callbacks=[*callbacks, losses],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, cases.rank_batches())
    return module, losses.losses


def _assert_same_tensors(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], **tolerance: Any) -> None:
    assert ours and ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], **tolerance)


def test_lora_under_fsdp2_equals_one_process_and_shards_every_weight(runs: Path) -> None:
    facts, tensors = _result(runs, "lora-fsdp2")
    module, losses = _one_process([LoRA(r=4)])
    torch.testing.assert_close(torch.tensor(facts["losses"]), torch.tensor(losses), **LOSS_TOLERANCE)
    reference = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    _assert_same_tensors(tensors, reference, **TENSOR_TOLERANCE)
    assert any(name.endswith("lora_B") and t.abs().sum() > 0 for name, t in tensors.items())  # it trained
    # Frozen base weights are sharded as well as the adapters; the optimizer holds only trainable ones.
    assert facts["sharded_parameters"] == facts["parameters"] > 0
    assert facts["optimizer_parameters"] == facts["trainable_parameters"] == len(reference)
    # Each rank stores half of every weight (dim 0 split in two; the 4-row lora_A shards are 2 rows).
    trainable = sum(p.numel() * p.element_size() for p in reference.values())
    frozen = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    assert facts["rank_bytes"] == {"trainable": trainable // 2, "frozen": frozen // 2, "optimizer": trainable}


def test_sharded_adapter_is_one_peft_loadable_file_equal_to_the_unsharded_run(runs: Path) -> None:
    peft = pytest.importorskip("peft")
    directory = runs / "lora-fsdp2-adapter"
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    module, _ = _one_process([LoRA(r=4)])
    inputs = cases.loader().dataset[0]["input_ids"][None]
    loaded = peft.PeftModel.from_pretrained(cases.network(), directory).eval()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=inputs).logits, module.net(input_ids=inputs).logits, **TENSOR_TOLERANCE)


def test_qlora_under_fsdp2_equals_one_process(runs: Path) -> None:
    pytest.importorskip("bitsandbytes")
    facts, tensors = _result(runs, "qlora-fsdp2")
    module, losses = _one_process([LoRA(r=4, quantize="nf4")])
    torch.testing.assert_close(torch.tensor(facts["losses"]), torch.tensor(losses), **LOSS_TOLERANCE)
    _assert_same_tensors(tensors, {n: p.detach() for n, p in module.named_parameters() if p.requires_grad},
                         **QLORA_TOLERANCE)


@pytest.mark.parametrize(
    "case", ["lora", "qlora", "sparsity", "layer_dropout", "sft", "fisher", "checkpointing", "attention"]
)
def test_callback_under_fsdp2_equals_ddp(runs: Path, case: str) -> None:
    sharded, sharded_tensors = _result(runs, f"{case}-fsdp2")
    replicated, replicated_tensors = _result(runs, f"{case}-ddp")
    assert len(sharded["losses"]) == cases.STEPS
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(replicated["losses"]), **EXACT)
    _assert_same_tensors(sharded_tensors, replicated_tensors, **EXACT)
    assert any(t.abs().sum() > 0 for name, t in sharded_tensors.items() if "lora_B" in name or "delta" in name)
    if case == "sparsity":
        assert sharded["blocks"] == replicated["blocks"] == 4  # 2 MLPs + 2 attentions sparse while training
    if case == "attention":  # set for the fit, put back in teardown
        assert sharded["implementation"] == replicated["implementation"] == "sdpa"
    if case == "layer_dropout":
        assert sharded["run_fractions"] == replicated["run_fractions"]
        assert min(sharded["run_fractions"].values()) < 1.0  # some block was skipped


def test_sparse_finetuning_under_fsdp2_selects_regrows_and_saves_one_diff(runs: Path) -> None:
    sharded = load_file(runs / "sft-fsdp2-indices.safetensors")
    replicated = load_file(runs / "sft-ddp-indices.safetensors")
    assert sharded and sharded.keys() == replicated.keys()
    for name in sharded:
        assert torch.equal(sharded[name], replicated[name])  # same entries after a regrowth at step 2
    base = cases.network()
    sharded_diff, replicated_diff = runs / "sft-fsdp2.diff.safetensors", runs / "sft-ddp.diff.safetensors"
    assert read_diff(sharded_diff).base_fingerprint == read_diff(replicated_diff).base_fingerprint
    assert read_diff(sharded_diff).nnz == read_diff(replicated_diff).nnz > 0
    apply_diff(base, sharded_diff)  # verifies the base fingerprint the sharded run wrote
    reference = cases.network()
    apply_diff(reference, replicated_diff)
    for (name, ours), (_, theirs) in zip(base.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(ours, theirs), name


def test_efficiency_monitor_under_fsdp2_logs_finite_figures(runs: Path) -> None:
    facts, _ = _result(runs, "efficiency-fsdp2")
    assert facts["logged"], "EfficiencyMonitor logged nothing"
    assert all(value == value and value >= 0 for value in facts["logged"].values())
    assert facts["totals"]["steps"] == cases.STEPS and facts["totals"]["dense_flops"] > 0


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_resume_from_a_sharded_checkpoint_is_bit_exact(runs: Path, strategy: str) -> None:
    facts, tensors = _result(runs, f"resume-{strategy}")
    assert facts["is_dir"] == (strategy == "fsdp2")  # FSDP2 writes a distributed checkpoint directory
    whole = {k.removeprefix("whole/"): v for k, v in tensors.items() if k.startswith("whole/")}
    resumed = {k.removeprefix("resumed/"): v for k, v in tensors.items() if k.startswith("resumed/")}
    _assert_same_tensors(resumed, whole, rtol=0, atol=0)


def test_resumed_fsdp2_run_equals_ddp(runs: Path) -> None:
    _, sharded = _result(runs, "resume-fsdp2")
    _, replicated = _result(runs, "resume-ddp")
    _assert_same_tensors(sharded, replicated, **EXACT)


def test_tensor_parallel_is_refused_before_the_module_changes(runs: Path) -> None:
    facts, _ = _result(runs, "tensor_parallel-fsdp2")
    assert "tensor_parallel_size=2" in facts["error"] and "strategy='fsdp2'" in facts["error"]
    assert facts["unchanged"]


def _trainer(strategy: Any, callbacks: list[pl.Callback]) -> Any:
    """What the callbacks' set-up reads of a Trainer (a CPU Trainer cannot hold FSDPStrategy)."""
    return SimpleNamespace(strategy=strategy, callbacks=callbacks)


@pytest.mark.parametrize("refused", [AdaptiveRankSearch, EightBitOptimizer])
def test_unsupported_callbacks_are_refused_under_fsdp2_before_lora_injects(refused: type) -> None:
    pytest.importorskip("bitsandbytes")
    lora, other = LoRA(r=4), refused()
    trainer = _trainer(FSDP2Strategy(), [lora, other])
    module = cases.UserModule()
    keys = sorted(module.state_dict())
    with pytest.raises(RuntimeError, match=rf"{refused.__name__} does not run under FSDP2 .* It supports DDP, single"):
        lora.setup(trainer, module, "fit")  # LoRA runs first and refuses for the other one
    assert not lora_layers(module) and sorted(module.state_dict()) == keys


_DEEPSPEED = type("DeepSpeedStrategy", (DDPStrategy,), {})  # its kind, without installing deepspeed


@pytest.mark.parametrize(
    ("strategy", "make", "match"),
    [
        (FSDPStrategy(), lambda: [LoRA(r=4, quantize="nf4")], r"LoRA\(quantize='nf4'\) does not run under FSDP: it flattens"),
        (_DEEPSPEED(), lambda: [LoRA(r=4, quantize="nf4")], r"does not run under DeepSpeed: it flattens \(FSDP\) or partitions"),
        (FSDPStrategy(), lambda: [LoRA(r=4), ContextualSparsity()], "ContextualSparsity does not run under FSDP .* flat shards"),
        (FSDPStrategy(), lambda: [SparseFineTuning()], "SparseFineTuning does not run under FSDP .* flat shards"),
    ],
    ids=["qlora-fsdp1", "qlora-deepspeed", "sparsity-fsdp1", "sft-fsdp1"],
)
def test_refusals_where_weights_are_flattened_leave_the_module_unchanged(strategy: Any, make: Any, match: str) -> None:
    pytest.importorskip("bitsandbytes")
    callbacks = make()
    module = cases.UserModule()
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    with pytest.raises(RuntimeError, match=match):
        callbacks[0].setup(_trainer(strategy, callbacks), module, "fit")
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not lora_layers(module) and not sparse_delta_layers(module)
