"""Tiny random-weight models of every family contextual sparsity describes, built from configs
(no hub): 2 layers, hidden 32, 4 query heads (2 kv heads where the family has GQA), head dim 8."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
import transformers as tf
from torch import nn

VOCAB, HIDDEN, INTERMEDIATE, LAYERS = 128, 32, 64, 2
_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
_GEMMA = dict(_DECODER, head_dim=8)
_MOE = dict(_DECODER, num_local_experts=4, num_experts_per_tok=2)


def _gpt2() -> nn.Module:
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS,
                                            n_head=4, n_positions=64))


def _falcon(**arch: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        kv = dict(num_kv_heads=2) if arch.get("new_decoder_architecture") else {}
        return tf.FalconForCausalLM(tf.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                    num_attention_heads=4, ffn_hidden_size=INTERMEDIATE, **kv, **arch))
    return build


# family -> builder of a model in eval mode (dropout off), random weights from the seed set by the caller
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "LLaMA": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_DECODER)),
    "Mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_DECODER, sliding_window=None)),
    "Qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_DECODER)),
    "Qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_DECODER, head_dim=8)),
    "Gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_GEMMA)),
    "Gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_GEMMA)),
    "Gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_GEMMA)),
    "Phi-3 (fused)": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_DECODER, pad_token_id=0)),
    "Phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**_DECODER)),
    "StarCoder2": lambda: tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**_DECODER)),
    "GPT-2 (Conv1D, fused c_attn)": _gpt2,
    "GPT-NeoX (fused QKV)": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=4, max_position_embeddings=64)),
    "Falcon (new decoder architecture)": _falcon(new_decoder_architecture=True),
    "Falcon (old, multi-query)": _falcon(new_decoder_architecture=False, multi_query=True),
    "Falcon (old, multi-head)": _falcon(new_decoder_architecture=False, multi_query=False),
    "OPT": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE,
                                                  num_hidden_layers=LAYERS, num_attention_heads=4,
                                                  max_position_embeddings=64, word_embed_proj_dim=HIDDEN)),
    "BLOOM": lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=4)),
    "GPT-J": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE,
                                                      n_layer=LAYERS, n_head=4, n_positions=64, rotary_dim=4)),
    "BERT": lambda: tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                               num_attention_heads=4, intermediate_size=INTERMEDIATE,
                                               max_position_embeddings=64), add_pooling_layer=False),
    "Mixtral (MoE)": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**_MOE)),
    "Qwen2-MoE": lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        **_DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)),
    "Qwen3-MoE": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        **_DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
}
MOE = {"Mixtral (MoE)", "Qwen2-MoE", "Qwen3-MoE"}


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


class FamilyModule(pl.LightningModule):
    """A user's LightningModule around one family's model; the loss (mean square of the logits or
    hidden states) is computed outside the model, so labels only tell context from output tokens."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.family = family
        self.net = build(family).train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.net(input_ids=batch["input_ids"])
        logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return logits.float().square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def token_batches(n: int = 8, length: int = 12) -> list[dict[str, torch.Tensor]]:
    """Samples whose first half is a prompt (labels -100: context, sparse) and second half an answer."""
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


class SparsityRecorder(pl.Callback):
    """The per-layer sparsity each training step achieved (read before the optimizer step)."""

    def __init__(self, sparsity: object) -> None:
        self.sparsity, self.seen = sparsity, []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.seen.append(dict(self.sparsity.state.layer_sparsity))
