"""The bad-input table of docs/bad_inputs.md, generated from these cases: every public callback and CLI
command, what the user sees, and the state afterwards, each checked here
(``LSFT_WRITE_DOCS=1 python3 -m pytest tests/callbacks/test_bad_inputs.py`` rewrites the table)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest

import sharded_cases as cases
from generated_docs import check_generated
from lightning_sft import (
    ActivationOffloading,
    AdaptiveRankSearch,
    AttentionImplementation,
    ContextualSparsity,
    EfficiencyMonitor,
    EightBitOptimizer,
    FusedCrossEntropy,
    GradientCheckpointing,
    LayerDropout,
    LoRA,
    SparseFineTuning,
)
from lightning_sft.cli import main
from lightning_sft.strategies import FSDP2Strategy
from module_state import assert_same_state, module_state

ROWS: dict[str, tuple[str, str, str, str]] = {}


@dataclass(frozen=True)
class Case:
    component: str
    shown: str  # the bad input as the user writes it
    run: Callable[..., Any]  # what the user wrote: constructed, or (given the module) set up or fitted


def _fit(module: pl.LightningModule, *callbacks: pl.Callback) -> None:
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, callbacks=list(callbacks), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, cases.loader(8), cases.loader(8))

CONSTRUCTION = [
    Case("LoRA", "LoRA(r=0)", lambda: LoRA(r=0)),
    Case("AdaptiveRankSearch", "AdaptiveRankSearch(candidates=())", lambda: AdaptiveRankSearch(candidates=())),
    Case("LayerDropout", "LayerDropout(rate=1.5)", lambda: LayerDropout(rate=1.5)),
    Case("SparseFineTuning", "SparseFineTuning(density=0)", lambda: SparseFineTuning(density=0)),
    Case("GradientCheckpointing", 'GradientCheckpointing(blocks="model.layers")',
         lambda: GradientCheckpointing(blocks="model.layers")),
    Case("AttentionImplementation", 'AttentionImplementation("flash")', lambda: AttentionImplementation("flash")),
    Case("EightBitOptimizer", "EightBitOptimizer(min_8bit_size=-1)", lambda: EightBitOptimizer(min_8bit_size=-1)),
    Case("EfficiencyMonitor", "EfficiencyMonitor(tokens_fn=3)", lambda: EfficiencyMonitor(tokens_fn=3)),
    Case("ContextualSparsity", 'ContextualSparsity(strategy="bogus")', lambda: ContextualSparsity(strategy="bogus")),
    Case("FusedCrossEntropy", "FusedCrossEntropy(chunk_size=0)", lambda: FusedCrossEntropy(chunk_size=0)),
    Case("FusedCrossEntropy", 'FusedCrossEntropy(backend="cuda")', lambda: FusedCrossEntropy(backend="cuda")),
    Case("ActivationOffloading", "ActivationOffloading(min_bytes=-1)", lambda: ActivationOffloading(min_bytes=-1)),
]
AT_FIT = [
    Case("LoRA", 'LoRA(target_modules=["nope"])', lambda m: _fit(m, LoRA(target_modules=["nope"]))),
    Case("AdaptiveRankSearch", "AdaptiveRankSearch() without LoRA", lambda m: _fit(m, AdaptiveRankSearch())),
    Case("LayerDropout", "LayerDropout(protect_first=2, protect_last=2) after LoRA(), on 2 blocks",
         lambda m: _fit(m, LoRA(r=2), LayerDropout(protect_first=2, protect_last=2))),
    Case("SparseFineTuning", "SparseFineTuning() with LoRA()", lambda m: _fit(m, LoRA(r=2), SparseFineTuning())),
    Case("GradientCheckpointing", 'GradientCheckpointing(blocks=["nope"]) after LoRA()',
         lambda m: _fit(m, LoRA(r=2), GradientCheckpointing(blocks=["nope"]))),
    Case("AttentionImplementation", 'AttentionImplementation("flash_attention_2") on CPU',
         lambda m: _fit(m, AttentionImplementation("flash_attention_2"))),
    Case("ContextualSparsity", 'ContextualSparsity(mlp_sparsity="auto", dense_layers=(), dense_warmup=0) with LoRA()',
         lambda m: _fit(m, LoRA(r=2), ContextualSparsity(mlp_sparsity="auto", dense_layers=(), dense_warmup=0))),
    Case("EightBitOptimizer", 'EightBitOptimizer() under strategy="fsdp2"',
         lambda m: _setup_under(m, FSDP2Strategy(), LoRA(r=2), EightBitOptimizer())),
    Case("FusedCrossEntropy", 'FusedCrossEntropy() under strategy="fsdp2"',
         lambda m: _setup_under(m, FSDP2Strategy(), LoRA(r=2), FusedCrossEntropy())),
    Case("FusedCrossEntropy", 'FusedCrossEntropy(backend="liger") after LoRA(), on CPU',
         lambda m: _fit(m, LoRA(r=2), FusedCrossEntropy(backend="liger"))),
    Case("ActivationOffloading", "ActivationOffloading() after LoRA(), on CPU",
         lambda m: _fit(m, LoRA(r=2), ActivationOffloading())),
]
CLI = [
    ("fit", ["fit", "--lora.r", "-1"]),
    ("fit", ["fit", "--sparsity", "bogus"]),
    ("fit", ["fit", "--model.model", "/nonexistent/dir"]),
    ("validate", ["validate", "--nope"]),
    ("test", ["test", "--trainer.devices", "0"]),
    ("bench", ["bench", "nope"]),
    ("diff", ["diff", "inspect", "/nonexistent.safetensors"]),
    ("federated", ["federated", "--clients", "0"]),
    ("plan", ["plan", "--model", "llama-3.1-8b", "--gpu-mem", "0.5GB"]),
    ("pretrain", ["pretrain", "--steps", "10"]),
    ("report", ["report", "/nonexistent"]),
]


def _setup_under(module: pl.LightningModule, strategy: Any, *callbacks: pl.Callback) -> None:
    """The callbacks' set-up as a fit under ``strategy`` runs it (a 2-process launch is test_fsdp2's)."""
    trainer = SimpleNamespace(strategy=strategy, callbacks=list(callbacks))
    for callback in callbacks:
        callback.setup(trainer, module, "fit")


def _seen(error: BaseException) -> str:
    return f"`{type(error).__name__}`: {' '.join(str(error).split())}"


@pytest.mark.parametrize("case", CONSTRUCTION, ids=lambda c: c.shown)
def test_a_bad_argument_is_refused_at_construction(case: Case) -> None:
    with pytest.raises((ValueError, TypeError)) as caught:
        case.run()
    assert str(caught.value)
    ROWS[case.shown] = (case.component, f"`{case.shown}`", _seen(caught.value), "nothing was built")


@pytest.mark.parametrize("case", AT_FIT, ids=lambda c: c.shown)
def test_a_refusal_at_fit_leaves_the_module_as_it_was(case: Case) -> None:
    module = cases.UserModule()
    before = module_state(copy.deepcopy(module))
    with pytest.raises((ValueError, TypeError, RuntimeError, ImportError)) as caught:
        case.run(module)
    assert_same_state(module_state(module), before)
    ROWS[case.shown] = (case.component, f"`{case.shown}`, at `fit`", _seen(caught.value), "the module as it was")


@pytest.mark.parametrize(("command", "argv"), CLI, ids=[" ".join(argv) for _, argv in CLI])
def test_a_cli_usage_error_is_one_line_and_exit_2(command: str, argv: list[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LSFT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lightning-sft")]
    assert len(lines) == 1 and ": error: " in lines[0]
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir()), "a failed command wrote files"
    ROWS[" ".join(argv)] = (f"`lightning-sft {command}`", f"`lightning-sft {' '.join(argv)}`",
                            f"exit 2: {lines[0]}", "nothing written")


def _table() -> str:
    lines = ["| component | bad input | what the user sees | state afterwards |", "|---|---|---|---|"]
    for component, shown, seen, state in ROWS.values():
        lines.append(f"| {component} | {shown} | {seen.replace('|', '/')} | {state} |")
    return "\n".join(lines)


def test_the_docs_table_is_generated_from_these_cases() -> None:
    if len(ROWS) != len(CONSTRUCTION) + len(AT_FIT) + len(CLI):
        pytest.skip("needs the whole module's results (run the file, not one test)")
    callbacks = {c.component for c in CONSTRUCTION} | {c.component for c in AT_FIT}
    import lightning_sft.callbacks as public

    assert callbacks == set(public.__all__)  # every public callback has a row
    check_generated("bad_inputs.md", "bad-input table", _table(), "tests/callbacks/test_bad_inputs.py")
