"""Tiny random-weight models of every common transformers family, built from configs (no hub)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
_DECODER = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_DECODER))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_DECODER))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**_DECODER, sliding_window=None))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        ))
    elif family == "bert":
        model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64))
    else:
        raise ValueError(family)
    return model.eval()


# Linear layers "all-linear" must adapt per family (2 blocks each); heads excluded.
EXPECTED_ADAPTED = {
    "llama": 2 * 7,
    "qwen2": 2 * 7,
    "mistral": 2 * 7,
    "gpt2": 2 * 4,  # c_attn, c_proj (attn), c_fc, c_proj (mlp): Conv1D
    "bert": 2 * 6 + 1,  # q, k, v, attention.output.dense, intermediate.dense, output.dense; pooler.dense
}
FAMILIES = list(EXPECTED_ADAPTED)


def batch(seed: int = 0, size: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def first_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class CausalLMModule(pl.LightningModule):
    """A user's ordinary LightningModule: the network lives in an attribute of its choosing."""

    def __init__(self, family: str = "llama", seed: int = 0, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build(family, seed).train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.net(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def loader(n: int = 32, batch_size: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(TokenDataset(n), batch_size=batch_size, shuffle=False)
