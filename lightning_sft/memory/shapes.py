"""The shape of a transformer, read from a transformers config: all the memory model needs.

Presets are shape data of common models (no weights, nothing downloaded); a config can also come
from a ``config.json`` path, a model directory, a dict, or a ``PretrainedConfig``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_sft.validation import check_int

# Shape-only configs in transformers' format (the fields the model reads), from the models' published
# config.json files.
_LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3.2-1b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "tie_word_embeddings": True},
    "llama-3.2-3b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
                     "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                     "tie_word_embeddings": True},
    "llama-3.1-70b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
                      "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    "llama-2-7b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
                    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40},
    "mistral-7b": {"model_type": "mistral", "hidden_act": "silu", "vocab_size": 32768, "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "tie_word_embeddings": False},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_act": "silu", "vocab_size": 152064, "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "tie_word_embeddings": False},
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_act": "silu", "vocab_size": 151936, "hidden_size": 896,
                     "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "tie_word_embeddings": True},
    "gemma-2b": {"model_type": "gemma", "hidden_act": "gelu_pytorch_tanh", "vocab_size": 256000, "hidden_size": 2048,
                 "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8,
                 "num_key_value_heads": 1, "head_dim": 256, "tie_word_embeddings": True},
    "phi-3-mini": {"model_type": "phi3", "hidden_act": "silu", "vocab_size": 32064, "hidden_size": 3072,
                   "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "tie_word_embeddings": False},
    "gpt2": {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "n_positions": 1024},
    "gpt2-xl": {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 1600, "n_layer": 48, "n_head": 25,
                "n_positions": 1024},
    # The shipped base's architecture (docs/base_model.md).
    "sft-llama-5m": {**_LLAMA, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704,
                     "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
                     "tie_word_embeddings": True},
}

# Families whose MLP is gated (SwiGLU / GeGLU: gate, up, down) and whose norms are RMSNorm.
_GATED_RMS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"}
_PLAIN_LAYERNORM = {"gpt2"}
_TIED_BY_DEFAULT = {"gpt2", "gemma", "gemma2"}  # transformers' default when a config.json omits the field


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's sizes. ``q_width`` = heads x head_dim; ``kv_width`` likewise for
    the key/value heads (GQA when smaller)."""

    family: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool
    rms_norm: bool
    tied_embeddings: bool
    qkv_bias: bool
    mlp_bias: bool
    learned_positions: int = 0  # rows of a learned position table (GPT-2), 0 for rotary

    def __post_init__(self) -> None:
        for name in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim"):
            check_int(getattr(self, name), name, 1, "Check the model config.")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads}).")

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def fused_projections(self) -> bool:
        """One q/k/v projection (and one gate/up projection when gated): GPT-2's c_attn, Phi-3's qkv_proj."""
        return self.family in ("gpt2", "phi3")

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each block's linear layers: the ones LoRA, QLoRA and sparse deltas target."""
        h, q, kv, f = self.hidden, self.q_width, self.kv_width, self.intermediate
        if self.fused_projections:
            mlp = [(h, 2 * f), (f, h)] if self.gated_mlp else [(h, f), (f, h)]
            return [(h, q + 2 * kv), (q, h), *mlp]
        mlp = [(h, f), (h, f), (f, h)] if self.gated_mlp else [(h, f), (f, h)]
        return [(h, q), (h, kv), (h, kv), (q, h), *mlp]

    def block_linear_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes())

    def block_other_params(self) -> int:
        """Norm weights (and LayerNorm biases) and linear biases of one block."""
        norms = 2 * self.hidden * (1 if self.rms_norm else 2)
        bias = (self.q_width + 2 * self.kv_width) if self.qkv_bias else 0
        if self.mlp_bias:
            bias += self.hidden + self.intermediate * (2 if self.gated_mlp else 1)
        if self.family == "gpt2":  # GPT-2's Conv1D layers all carry biases
            bias = self.q_width + 2 * self.kv_width + self.hidden + self.intermediate + self.hidden
        return norms + bias

    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.learned_positions * self.hidden

    def head_params(self) -> int:
        """The output head's own weight (0 when tied to the embedding)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def final_norm_params(self) -> int:
        return self.hidden * (1 if self.rms_norm else 2)

    def num_params(self) -> int:
        per_block = self.block_linear_params() + self.block_other_params()
        return self.layers * per_block + self.embedding_params() + self.head_params() + self.final_norm_params()


# GPT-2 style config.json names of the standard fields (transformers maps them the same way).
_ALIASES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}


def _config_fields(config: Any) -> Mapping[str, Any]:
    """The fields of ``config`` (a preset name, a config.json / model directory path, a dict in
    config.json format, or a ``PretrainedConfig``) as a mapping, without loading transformers for
    plain files and dicts."""
    if isinstance(config, Mapping):
        if "model_type" not in config:
            raise ValueError("A config dict needs a 'model_type' (e.g. 'llama'), as in a config.json.")
        return config
    if isinstance(config, (str, Path)):
        if str(config) in PRESETS:
            return PRESETS[str(config)]
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            try:
                return _config_fields(json.loads(path.read_text()))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON: {error}") from None
        raise ValueError(
            f"Unknown model {str(config)!r}: use a preset ({', '.join(sorted(PRESETS))}), a config.json file, or a"
            " model directory holding one."
        )
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict) and hasattr(config, "model_type"):  # a transformers PretrainedConfig
        return {**to_dict(), "model_type": config.model_type}
    raise TypeError(f"Expected a preset name, a path, a dict or a PretrainedConfig; got {type(config).__name__}.")


def hf_config(config: Any) -> Any:
    """A transformers ``PretrainedConfig`` for anything ``model_shape`` takes (to build the model)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    fields = dict(_config_fields(config))
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def model_shape(config: Any) -> ModelShape:
    """The ``ModelShape`` of ``config``: a preset name, a config.json or model directory path, a dict
    in config.json format, or a transformers ``PretrainedConfig``."""
    fields = _config_fields(config)

    def get(name: str, default: Any = None) -> Any:
        value = fields.get(name, fields.get(_ALIASES.get(name, ""), default))
        return default if value is None else value

    family = fields["model_type"]
    if family not in _GATED_RMS | _PLAIN_LAYERNORM:
        known = ", ".join(sorted(_GATED_RMS | _PLAIN_LAYERNORM))
        raise ValueError(f"model_type {family!r} is not modelled yet; supported families: {known}.")
    missing = [name for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if get(name) is None]
    if missing:
        raise ValueError(f"The {family} config lacks {', '.join(missing)}: give a complete config.json.")
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    gated = family in _GATED_RMS
    return ModelShape(
        family=family,
        vocab=get("vocab_size"),
        hidden=hidden,
        intermediate=get("intermediate_size") or get("n_inner") or 4 * hidden,
        layers=get("num_hidden_layers"),
        heads=heads,
        kv_heads=get("num_key_value_heads", heads),
        head_dim=get("head_dim") or (hidden // heads if heads else 0),
        gated_mlp=gated,
        rms_norm=gated,
        tied_embeddings=bool(get("tie_word_embeddings", family in _TIED_BY_DEFAULT)),
        qkv_bias=bool(get("attention_bias", False)) or family == "qwen2",
        mlp_bias=bool(get("mlp_bias", False)),
        learned_positions=get("n_positions", 1024) if family == "gpt2" else 0,
    )
