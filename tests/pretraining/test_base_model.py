"""The shipped pretrained base loads offline and is genuinely pretrained; its recipe reproduces."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_sft.assets import SHIPPED_MODELS
from lightning_sft.pretraining.corpus import number_text
from lightning_sft.cli.pretrain import main as pretrain_main

BASE = SHIPPED_MODELS["sft-llama-5m"]


def test_loads_offline_and_is_small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(BASE, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(BASE, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 5e6 <= sum(p.numel() for p in model.parameters()) <= 20e6
    assert (BASE / "model.safetensors").stat().st_size <= 25 * 2**20
    text = "def add(a, b):\n    return a + b"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None


def test_is_pretrained_not_random() -> None:
    model = AutoModelForCausalLM.from_pretrained(BASE, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(BASE, local_files_only=True)
    ids = tokenizer("\n".join(number_text(30, seed=12345)), return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 0.5 * math.log(len(tokenizer)), loss  # a random model sits near ln(vocab) = 8.3


def test_training_record_documents_the_run() -> None:
    record = json.loads((BASE / "pretraining.json").read_text())
    assert record["training"]["steps"] > 0 and record["training"]["val_loss"] < 4
    assert record["model"]["parameters"] == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(BASE, local_files_only=True).parameters()
    )


def test_pretraining_script_runs(tmp_path) -> None:
    code = pretrain_main(["--out", str(tmp_path), "--steps", "2", "--number-lines", "200", "--seq-len", "32",
                          "--batch-size", "2", "--vocab-size", "400", "--val-interval", "2"])
    assert code == 0
    record = json.loads((tmp_path / "pretraining.json").read_text())
    assert record["training"]["steps"] == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).config.vocab_size == 4096
