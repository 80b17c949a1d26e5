"""The embedded task: deterministic generation, disjoint splits, label masks, JSONL, exact match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lightning_sft.assets import SHIPPED_MODELS
from lightning_sft.data import PromptResponseData
from lightning_sft.data.prompt_response import collate, encode
from lightning_sft.tasks import Example, ResponseExactMatch, generate_splits, read_jsonl, write_jsonl
from lightning_sft.tasks.exact_match import IGNORE_INDEX

BASE = SHIPPED_MODELS["sft-llama-5m"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(BASE, local_files_only=True)


def test_generation_is_deterministic_and_splits_are_disjoint() -> None:
    first, again, other = generate_splits(200, 50, 50, seed=0), generate_splits(200, 50, 50, seed=0), generate_splits(
        200, 50, 50, seed=1
    )
    assert first == again and first != other
    assert [len(first[s]) for s in ("train", "val", "test")] == [200, 50, 50]
    prompts = [{e.prompt for e in first[s]} for s in ("train", "val", "test")]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert {e.skill for e in first["test"]} == {"add", "sub", "max", "next"}


@pytest.mark.parametrize("example", generate_splits(40, 0, 0, seed=3)["train"])
def test_answers_are_correct(example: Example) -> None:
    numbers = [int(word.strip("?,")) for word in example.prompt.split() if word.strip("?,").isdigit()]
    expected = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "max": max, "next": lambda a: a + 1}[example.skill]
    assert example.response == f" {expected(*numbers)}"
    assert example.prompt.startswith("Question: ") and example.prompt.endswith("\nAnswer:")


def test_label_mask_covers_exactly_the_response_and_eos(tokenizer) -> None:
    example = Example("Question: What is 2 plus 3?\nAnswer:", " 5")
    encoded = encode(example, tokenizer, max_length=64)
    prompt_len = len(tokenizer(example.prompt, add_special_tokens=False).input_ids)
    labels, ids = encoded["labels"], encoded["input_ids"]
    assert (labels[:prompt_len] == IGNORE_INDEX).all()
    assert torch.equal(labels[prompt_len:], ids[prompt_len:])
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_len:-1]) == " 5"

    batch = collate([encoded, encode(Example("Q:", " 10"), tokenizer, 64)], pad_id=tokenizer.pad_token_id)
    short = batch["attention_mask"][1].sum()
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all() and (batch["input_ids"][1, short:] == 0).all()


def test_overlong_examples_are_refused(tokenizer) -> None:
    with pytest.raises(ValueError, match="max_length"):
        encode(Example("Question: " + "word " * 80, " 1"), tokenizer, max_length=32)


def test_jsonl_round_trip_and_errors(tmp_path: Path) -> None:
    examples = generate_splits(5, 0, 0)["train"]
    write_jsonl(examples, tmp_path / "a.jsonl")
    assert read_jsonl(tmp_path / "a.jsonl") == examples
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n{\"prompt\": 1}\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with 'prompt' and 'response'"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_exact_match_needs_every_response_token() -> None:
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4],
                           [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    logits = torch.zeros(3, 4, 8)
    # Position t predicts label t+1: sample 0 right on both tokens, sample 1 wrong on the last.
    logits[0, 1, 3] = logits[0, 2, 4] = 1
    logits[1, 1, 3] = logits[1, 2, 5] = 1
    metric = ResponseExactMatch()
    metric.update(logits, labels)
    assert metric.compute().item() == pytest.approx(0.5)  # the unlabeled row does not count


def test_data_module_uses_jsonl_files_and_validates(tmp_path: Path) -> None:
    write_jsonl([Example("Say hi:", " hi")] * 6, tmp_path / "train.jsonl")
    data = PromptResponseData(tokenizer="sft-llama-5m", train_file=str(tmp_path / "train.jsonl"), num_val=4,
                              num_test=4, batch_size=3)
    data.setup("fit")
    assert [e.prompt for e in data.splits["train"]] == ["Say hi:"] * 6
    assert next(iter(data.train_dataloader()))["input_ids"].shape[0] == 3
    with pytest.raises(ValueError, match="does not exist"):
        PromptResponseData(tokenizer="sft-llama-5m", train_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="neither a shipped model name nor a directory"):
        PromptResponseData(tokenizer="no-such-model")
    with pytest.raises(ValueError, match="batch_size"):
        PromptResponseData(tokenizer="sft-llama-5m", batch_size=0)
