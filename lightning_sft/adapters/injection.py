"""Putting LoRA adapters into a module tree, describing them, folding them in and out."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.adapters.quantization import is_quantized
from lightning_sft.adapters.targeting import ALL_LINEAR, TargetSpec, select_targets, validate_target_spec
from lightning_sft.anatomy.modules import replace_submodule
from lightning_sft.fingerprint import fingerprint_base


def _pattern_value(name: str, pattern: Mapping[str, float], default: float) -> float:
    """Per-module override: a key matches a module whose name equals it or ends in '.' + key."""
    for key, value in pattern.items():
        if name == key or name.endswith("." + key):
            return value
    return default


@dataclass(frozen=True)
class LoRAConfig:
    """What adapters to build; validated on construction so errors come before any model change."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: TargetSpec = ALL_LINEAR
    exclude_modules: TargetSpec | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_rank(self.r, "r")
        _check_alpha(self.alpha, "alpha")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1); got {self.dropout!r}. Use 0.0 to disable adapter dropout.")
        validate_target_spec(self.target_modules, "target_modules")
        validate_target_spec(self.exclude_modules, "exclude_modules")
        for key, rank in self.rank_pattern.items():
            _check_rank(rank, f"rank_pattern[{key!r}]")
        for key, alpha in self.alpha_pattern.items():
            _check_alpha(alpha, f"alpha_pattern[{key!r}]")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", list(self.target_modules))
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            object.__setattr__(self, "exclude_modules", list(self.exclude_modules))

    def rank_for(self, name: str) -> int:
        return int(_pattern_value(name, self.rank_pattern, self.r))

    def alpha_for(self, name: str) -> float:
        return float(_pattern_value(name, self.alpha_pattern, self.alpha))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_rank(value: Any, argument: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{argument}` must be a positive integer; got {value!r}. Typical LoRA ranks are 4-64.")


def _check_alpha(value: Any, argument: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{argument}` must be a positive number; got {value!r}. A common choice is 2 * r.")


def lora_layers(root: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer under ``root`` by its name relative to ``root``."""
    return {name: m for name, m in root.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(root: nn.Module, config: LoRAConfig, generator: torch.Generator | None = None) -> list[str]:
    """Wrap the targeted layers of ``root`` with LoRA and freeze everything else.

    All checks run and all new layers are built before the first swap, so a bad configuration
    leaves ``root`` untouched. The adapters are drawn from ``generator`` (a CPU generator) if given,
    else from the global one.
    """
    if lora_layers(root):
        raise RuntimeError(
            f"{type(root).__name__} already has LoRA adapters. Add the LoRA callback once, or call"
            " `merge_adapter(module, unload=True)` to remove the existing adapters first."
        )
    targets = select_targets(root, config.target_modules, config.exclude_modules)
    structure = {
        name: {"r": config.rank_for(name), "alpha": config.alpha_for(name)} for name in targets
    }
    return inject_structure(root, structure, dropout=config.dropout, use_rslora=config.use_rslora, generator=generator)


def inject_structure(
    root: nn.Module,
    structure: Mapping[str, Mapping[str, Any]],
    dropout: float = 0.0,
    use_rslora: bool = False,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Wrap exactly the named layers with the given per-layer rank and alpha (used to rebuild saved adapters)."""
    built = {
        name: LoRALinear(root.get_submodule(name), int(spec["r"]), float(spec["alpha"]), dropout, use_rslora, generator)
        for name, spec in structure.items()
    }
    for param in root.parameters():
        param.requires_grad_(False)
    for name, layer in built.items():
        replace_submodule(root, name, layer)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return list(built)


def adapter_structure(root: nn.Module) -> dict[str, dict[str, Any]]:
    """JSON-serialisable description of the adapters: enough to rebuild them before loading weights."""
    return {name: {"r": layer.r, "alpha": layer.alpha} for name, layer in lora_layers(root).items()}


def _require_adapters(root: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(root)
    if not layers:
        raise ValueError(f"{type(root).__name__} has no LoRA adapters. Add the `LoRA` callback or call `load_adapter`.")
    return layers


def merge_adapter(root: nn.Module, unload: bool = False) -> nn.Module:
    """Fold every adapter into its base weight, for export or adapter-free inference.

    With ``unload=True`` the wrappers are replaced by their (merged) base layers, giving the plain
    model back with its original parameter names; that cannot be undone by ``unmerge_adapter``.
    """
    layers = _require_adapters(root)
    quantized = [name for name, layer in layers.items() if is_quantized(layer.base_layer)]
    if quantized:  # refused before the first merge, so no layer is left merged
        raise RuntimeError(
            f"{len(quantized)} adapters sit on a 4-bit (QLoRA) base (e.g. {quantized[0]}), which cannot take a merged"
            " update. Save the adapter (save_adapter), load it onto the unquantized base model (load_adapter) and"
            " merge there."
        )
    for layer in layers.values():
        if not layer.merged:
            layer.merge()
    if unload:
        for name, layer in layers.items():
            replace_submodule(root, name, layer.base_layer)
    return root


def unmerge_adapter(root: nn.Module) -> nn.Module:
    """Subtract every merged adapter from its base weight again."""
    for layer in _require_adapters(root).values():
        if layer.merged:
            layer.unmerge()
    return root


def base_fingerprint(root: nn.Module) -> str:
    """Fingerprint of the base weights, the same before and after adapters are injected."""
    layers = lora_layers(root)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("Adapters are merged into the base weights; call `unmerge_adapter` first.")
    return fingerprint_base(root)
