"""Saving and loading adapters in the layout HF peft reads (``PeftModel.from_pretrained``)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_sft.adapters.injection import base_fingerprint, inject_structure, lora_layers
from lightning_sft.anatomy.linear import is_supported_linear, linear_features, weight_is_transposed
from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.atomic_io import atomic_path
from lightning_sft.sharding import first_rank_writes, fsdp1_full_parameters, full_tensor, has_sharded_parameters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY_PREFIX = "base_model.model."
_FINGERPRINT_KEY = "lightning_sft.base_fingerprint"
_KEY_PATTERN = re.compile(rf"^{re.escape(_KEY_PREFIX)}(?P<name>.+)\.lora_(?P<part>[AB])\.weight$")


def peft_root(module: nn.Module) -> tuple[nn.Module, str]:
    """The model peft would wrap: the outermost HF ``PreTrainedModel`` inside ``module``, else ``module``.

    Adapter names are stored relative to it, so a LightningModule holding ``self.model`` saves
    files that load straight onto the bare HF model.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return module, ""
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return sub, f"{name}." if name else ""
    return module, ""


def _compact_targets(root: nn.Module, names: list[str]) -> list[str]:
    """Module-name suffixes when they select exactly ``names`` (what peft configs usually hold), else full names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {
        n
        for n, m in root.named_modules()
        if (is_supported_linear(m) or isinstance(m, LoRALinear)) and ".base_layer" not in n and n.rsplit(".", 1)[-1] in suffixes
    }
    return suffixes if selected == set(names) else sorted(names)


def _task_type(root: nn.Module) -> str | None:
    return "CAUSAL_LM" if type(root).__name__.endswith("ForCausalLM") else None


def save_adapter(module: nn.Module, save_directory: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (peft layout) into ``save_directory``.

    The safetensors metadata carries a fingerprint of the base weights, checked by ``load_adapter``.
    Each file is written atomically. A sharded module is gathered (FSDP2, ZeRO-3: tensor by tensor; FSDP1:
    its units whole) and written by rank 0: call this on every rank then, as Lightning's ``save_checkpoint``.
    """
    root, _ = peft_root(module)
    layers = lora_layers(root)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no LoRA adapters to save. Add the `LoRA` callback first.")
    tensors: dict[str, torch.Tensor] = {}
    with fsdp1_full_parameters(module):
        fingerprint = base_fingerprint(root)  # raises if merged
        for name, layer in layers.items():
            for part, weight in (("A", layer.lora_A), ("B", layer.lora_B)):
                tensors[f"{_KEY_PREFIX}{name}.lora_{part}.weight"] = full_tensor(weight).detach().to("cpu").contiguous()
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    rslora = {layer.use_rslora for layer in layers.values()}
    dropout = {layer.dropout_p for layer in layers.values()}
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(root),
        "base_model_name_or_path": getattr(getattr(root, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropout),
        "use_rslora": any(rslora),
        "target_modules": _compact_targets(root, list(layers)),
        "rank_pattern": {re.escape(n): layer.r for n, layer in layers.items() if layer.r != r},
        "alpha_pattern": {re.escape(n): layer.alpha for n, layer in layers.items() if layer.alpha != alpha},
        "fan_in_fan_out": any(weight_is_transposed(layer.base_layer) for layer in layers.values()),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(save_directory)
    with first_rank_writes(has_sharded_parameters(root)) as writes:
        if writes:
            with atomic_path(directory / WEIGHTS_NAME) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "pt", _FINGERPRINT_KEY: fingerprint})
            with atomic_path(directory / CONFIG_NAME) as tmp:
                tmp.write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _pattern_lookup(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """peft's rule: a pattern key matches a module whose name ends in it (as a regex)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], str | None]:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path} is a {config.get('peft_type')!r} adapter; only LoRA adapters are supported.")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ValueError(f"{config_path} trains biases or whole modules (bias/modules_to_save); only plain LoRA loads.")
    weights: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_path), framework="pt") as handle:
        fingerprint = (handle.metadata() or {}).get(_FINGERPRINT_KEY)
        for key in handle.keys():
            match = _KEY_PATTERN.match(key)
            if match is None:
                raise ValueError(f"{weights_path} holds {key!r}, which is not a LoRA A/B weight; cannot load it.")
            weights.setdefault(match["name"], {})[match["part"]] = handle.get_tensor(key)
    incomplete = [n for n, parts in weights.items() if set(parts) != {"A", "B"}]
    if incomplete or not weights:
        raise ValueError(f"{weights_path} is missing lora_A or lora_B weights for: {incomplete or 'every layer'}.")
    return config, weights, fingerprint


def load_adapter(module: nn.Module, directory: str | os.PathLike, verify_base: bool = True) -> list[str]:
    """Load a peft-layout LoRA adapter into ``module``, injecting the adapter layers if it has none.

    Every check (layer names, shapes, existing adapters, base fingerprint) runs before the first
    change, so a refused adapter leaves ``module`` as it was. Returns the adapted layer names.
    """
    config, weights, fingerprint = _read_adapter(Path(directory))
    root, _ = peft_root(module)
    existing = lora_layers(root)
    for name, parts in weights.items():
        try:
            layer = root.get_submodule(name)
        except AttributeError:
            raise ValueError(f"The adapter targets {name!r}, which {type(root).__name__} does not have.") from None
        base = layer.base_layer if isinstance(layer, LoRALinear) else layer
        if not is_supported_linear(base):
            raise TypeError(f"The adapter targets {name!r}, a {type(base).__name__}, not a linear layer.")
        in_features, out_features = linear_features(base)
        rank = parts["A"].shape[0]
        if parts["A"].shape != (rank, in_features) or parts["B"].shape != (out_features, rank):
            raise ValueError(
                f"Shape mismatch for {name!r}: adapter A {tuple(parts['A'].shape)} / B {tuple(parts['B'].shape)}, but the"
                f" layer maps {in_features} -> {out_features}. The adapter was made for another architecture."
            )
    alphas = config.get("alpha_pattern") or {}
    structure = {
        name: {"r": parts["A"].shape[0], "alpha": float(_pattern_lookup(alphas, name, config["lora_alpha"]))}
        for name, parts in weights.items()
    }
    rslora = bool(config.get("use_rslora", False))
    if existing and {n: {"r": l.r, "alpha": l.alpha} for n, l in existing.items()} != structure or any(
        layer.use_rslora != rslora for layer in existing.values()
    ):
        raise ValueError(
            "The module already has adapters of another layout (layers, ranks or alphas differ); call"
            " `merge_adapter(module, unload=True)` first or load into a fresh model."
        )
    if verify_base and fingerprint is not None and fingerprint != base_fingerprint(root):
        raise ValueError(
            "The adapter was trained on a different base model (weight fingerprint mismatch). Load the base it was"
            " made for, or pass verify_base=False if you are sure."
        )
    if not existing:
        inject_structure(root, structure, float(config.get("lora_dropout", 0.0)), rslora)
    layers = lora_layers(root)
    with torch.no_grad():
        for name, parts in weights.items():
            layers[name].lora_A.copy_(parts["A"])
            layers[name].lora_B.copy_(parts["B"])
    return list(weights)
