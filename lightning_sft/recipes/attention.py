"""Choosing the attention kernel of Hugging Face transformers models.

Pure torch and transformers (no Lightning). ``eager`` materialises the attention probabilities, a
``batch x heads x seq x seq`` tensor that autograd keeps for the backward pass; ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention``), ``flex_attention`` and FlashAttention
recompute them blockwise in the backward and keep only the output and a per-row log-sum-exp.
Transformers 5 reads ``config._attn_implementation`` at every forward, so a change applies to the next
forward of an existing model (``PreTrainedModel.set_attn_implementation``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
# The package each FlashAttention version imports; without it transformers would fetch a kernel from the hub.
_FLASH_PACKAGES = {
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn 3 (hopper build)"),
}


def check_implementation(implementation: Any) -> str:
    """``implementation`` if it names a supported attention implementation; else a ValueError listing them."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention implementation {implementation!r}; use one of {', '.join(IMPLEMENTATIONS)}."
            " 'sdpa' (torch's fused attention) is the usual choice."
        )
    return implementation


def hf_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost transformers ``PreTrainedModel``s in ``model`` (``model`` itself if it is one)."""
    from transformers import PreTrainedModel

    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        nested = any(not outer or name.startswith(f"{outer}.") for outer, _ in found)
        if isinstance(module, PreTrainedModel) and not nested:
            found.append((name, module))
    return found


def set_attention_implementation(model: nn.Module, implementation: str) -> str:
    """Switch every Hugging Face model in ``model`` to ``implementation``; returns the previous one (of
    the first model), so ``set_attention_implementation(model, previous)`` undoes it.

    Refused with the reason, leaving ``model`` unchanged: an unknown name, no transformers model inside,
    a family without that implementation, FlashAttention without a CUDA GPU or the flash-attn package,
    and flex_attention without a CUDA GPU.
    """
    check_implementation(implementation)
    models = hf_models(model)
    if not models:
        raise TypeError(
            f"{type(model).__name__} holds no Hugging Face transformers model (PreTrainedModel), whose attention"
            " implementation is a config setting. For your own attention, call"
            " torch.nn.functional.scaled_dot_product_attention in its forward instead of softmax(q k^T) v."
        )
    if implementation in _FLASH_PACKAGES:
        _check_flash(implementation)
    if implementation == "flex_attention" and not torch.cuda.is_available():
        raise ValueError(
            "flex_attention trains on GPU only (torch has no CPU backward for it) and there is no CUDA GPU here."
            " Use 'sdpa'."
        )
    for name, hf_model in models:
        if not type(hf_model)._can_set_attn_implementation():
            raise ValueError(
                f"{type(hf_model).__name__} ({name or 'the model'}) does not route its attention through transformers'"
                " attention interface, so its implementation cannot change after loading: pass"
                f" attn_implementation={implementation!r} to from_pretrained / from_config instead."
            )
    previous = models[0][1].config._attn_implementation
    saved = {id(config): (config, config._attn_implementation_internal) for config in _configs(models)}
    try:
        for _, hf_model in models:
            hf_model.set_attn_implementation(implementation)
    except (ValueError, ImportError) as error:
        for config, value in saved.values():
            config._attn_implementation_internal = value
        raise ValueError(f"Cannot use attention implementation {implementation!r}: {error}") from None
    return previous


def _check_flash(implementation: str) -> None:
    package, pip_name = _FLASH_PACKAGES[implementation]
    if not torch.cuda.is_available():
        raise ValueError(
            f"{implementation} needs a CUDA GPU and there is none here (torch.cuda.is_available() is False). Use"
            " 'sdpa': on CPU and GPU it also keeps no seq x seq attention matrix for the backward pass."
        )
    if importlib.util.find_spec(package) is None:
        raise ImportError(
            f"{implementation} needs the {pip_name} package (module {package!r}), which is not installed; install it"
            " (pip install flash-attn --no-build-isolation) or use 'sdpa'."
        )


def _configs(models: list[tuple[str, nn.Module]]) -> list[Any]:
    """Every config the switch may touch: each transformers model's inside ``models`` and their sub-configs."""
    from transformers import PretrainedConfig, PreTrainedModel

    configs: dict[int, Any] = {}
    pending = [m.config for _, model in models for m in model.modules() if isinstance(m, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) in configs:
            continue
        configs[id(config)] = config
        pending.extend(
            sub for key in config.sub_configs if isinstance(sub := getattr(config, key, None), PretrainedConfig)
        )
    return list(configs.values())
