"""``PromptResponseData``: prompt/response pairs tokenized for fine-tuning, labels only on the response."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightning_sft.assets import resolve_model_dir
from lightning_sft.tasks.arithmetic import Example, generate_splits, read_jsonl
from lightning_sft.tasks.exact_match import IGNORE_INDEX


def encode(example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, torch.Tensor]:
    """Token ids of prompt + response + EOS; labels are -100 on the prompt so only the response is learnt."""
    prompt = tokenizer(example.prompt, add_special_tokens=False).input_ids
    response = tokenizer(example.response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    if len(prompt) + len(response) > max_length:
        raise ValueError(
            f"An example has {len(prompt) + len(response)} tokens, more than max_length={max_length}; raise"
            f" --data.max_length or shorten it: {example.prompt[:60]!r}..."
        )
    ids = torch.tensor(prompt + response)
    labels = torch.tensor([IGNORE_INDEX] * len(prompt) + response)
    return {"input_ids": ids, "labels": labels}


def collate(samples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; padding is masked out and carries no label."""
    length = max(len(s["input_ids"]) for s in samples)
    batch = {
        "input_ids": torch.full((len(samples), length), pad_id),
        "attention_mask": torch.zeros((len(samples), length), dtype=torch.long),
        "labels": torch.full((len(samples), length), IGNORE_INDEX),
    }
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        batch["input_ids"][row, :n] = sample["input_ids"]
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = sample["labels"]
    return batch


# Files one of which a saved tokenizer directory has (fast, config, sentencepiece, BPE).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class PromptResponseData(pl.LightningDataModule):
    """Fine-tuning data with a prompt/response split.

    By default the embedded arithmetic task is generated (deterministic under ``seed``); pass
    ``train_file`` (and optionally ``val_file`` / ``test_file``) to use your own JSONL files with
    ``prompt`` and ``response`` fields instead.

    Args:
        tokenizer: a shipped model name or a local directory holding the tokenizer. ``None`` uses the
            tokenizer of the model being trained (its ``model`` hyperparameter, as ``CausalLM`` has).
        train_file / val_file / test_file: JSONL files; generated splits are used for any left out.
        num_train / num_val / num_test: sizes of the generated splits.
        batch_size: samples per batch.
        max_length: longest allowed example in tokens; longer ones are refused, not truncated.
        seed: generation seed.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        num_train: int = 4000,
        num_val: int = 200,
        num_test: int = 500,
        batch_size: int = 32,
        max_length: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name in ("batch_size", "max_length"):
            value = locals()[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name, path in (("train_file", train_file), ("val_file", val_file), ("test_file", test_file)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}={path!r} does not exist; give a JSONL file with prompt/response fields.")
        if tokenizer is not None and resolve_model_dir(tokenizer) is None:
            raise ValueError(
                f"tokenizer={tokenizer!r} is neither a shipped model name nor a directory; pass the model's directory."
            )
        self.save_hyperparameters()
        self.splits: dict[str, list[Example]] = {}
        self._encoded: dict[str, list[dict[str, torch.Tensor]]] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            name = self.hparams.tokenizer or self._model_name()
            directory = resolve_model_dir(name)
            if directory is None:
                raise ValueError(f"The model {name!r} has no tokenizer directory; pass --data.tokenizer DIR.")
            if not any((Path(directory) / file).is_file() for file in _TOKENIZER_FILES):
                # transformers would guess a slow tokenizer and ask for sentencepiece or tiktoken instead
                raise ValueError(
                    f"{directory} holds no tokenizer ({', '.join(_TOKENIZER_FILES)}); pass the directory of the"
                    " tokenizer the model was trained with: --data.tokenizer DIR (PromptResponseData(tokenizer=DIR))."
                )
            self._tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        return self._tokenizer

    def _model_name(self) -> str:
        module = self.trainer.lightning_module if self.trainer is not None else None
        name = getattr(module, "hparams", {}).get("model") if module is not None else None
        if not isinstance(name, str):
            raise ValueError("PromptResponseData needs a tokenizer: pass tokenizer=DIR (--data.tokenizer DIR).")
        return name

    def setup(self, stage: str) -> None:
        if self._encoded:
            return
        hp = self.hparams
        generated = generate_splits(hp.num_train, hp.num_val, hp.num_test, hp.seed)
        files = {"train": hp.train_file, "val": hp.val_file, "test": hp.test_file}
        self.splits = {name: read_jsonl(path) if path else generated[name] for name, path in files.items()}
        self._encoded = {
            name: [encode(example, self.tokenizer, hp.max_length) for example in examples]
            for name, examples in self.splits.items()
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self._encoded[split]:
            raise ValueError(f"The {split} split is empty; set --data.num_{split} or --data.{split}_file.")
        return DataLoader(
            self._encoded[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            collate_fn=functools.partial(collate, pad_id=self.tokenizer.pad_token_id),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
