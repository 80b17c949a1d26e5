"""``RandomTokenData``: uniform random token sequences, the CLI's default data until a real task exists.

Loss on it cannot go far below ``log(vocab_size)``; it is for smoke tests and cost measurements.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset


class _TokenDataset(Dataset):
    """Fixed random sequences, generated once so every epoch (and every run) sees the same data."""

    def __init__(self, num: int, seq_len: int, vocab_size: int, generator: torch.Generator) -> None:
        self.input_ids = torch.randint(0, vocab_size, (num, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class RandomTokenData(pl.LightningDataModule):
    """Deterministic random token batches of dicts with ``input_ids``, ``attention_mask`` and ``labels``.

    Args:
        vocab_size: token ids are drawn from ``[0, vocab_size)``; must not exceed the model's vocabulary.
        seq_len: tokens per sequence; must not exceed the model's maximum positions.
        batch_size: sequences per batch.
        num_train: training sequences.
        num_val: validation sequences (the test split has as many).
        seed: seeds the data only, independent of ``seed_everything``.
    """

    def __init__(
        self,
        vocab_size: int = 1024,
        seq_len: int = 64,
        batch_size: int = 8,
        num_train: int = 256,
        num_val: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("seq_len", seq_len),
            ("batch_size", batch_size),
            ("num_train", num_train),
            ("num_val", num_val),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}.")
        self.save_hyperparameters()
        self._splits: dict[str, _TokenDataset] = {}

    def setup(self, stage: str) -> None:
        if self._splits:
            return
        hp = self.hparams
        generator = torch.Generator().manual_seed(hp.seed)
        # One generator, fixed order: each split is the same whatever stage runs first.
        for split, num in (("train", hp.num_train), ("val", hp.num_val), ("test", hp.num_val)):
            self._splits[split] = _TokenDataset(num, hp.seq_len, hp.vocab_size, generator)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self._splits[split], batch_size=self.hparams.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
