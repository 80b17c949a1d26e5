"""What a rank-search trial changes in the module, and how it is put back: the adapters, rebuilt at a
rank from LoRA's own seed; the other tensors training may change, copied and restored; and the rank
components' importance, read from the adapters' gradients.

Pure torch, no Lightning: the ``AdaptiveRankSearch`` callback runs the trials around these.
"""

from __future__ import annotations

import torch

from lightning_sft.adapters.injection import LoRAConfig, inject_lora, lora_layers
from lightning_sft.anatomy.modules import replace_submodule
from lightning_sft.rank_search.search import component_importance, config_at_ranks

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")

Snapshot = list[tuple[torch.Tensor, torch.Tensor]]


def build_adapters(
    module: torch.nn.Module, config: LoRAConfig, seed: int, targets: list[str], ranks: int | dict[str, int]
) -> None:
    """Replace the adapters by fresh ones at ``ranks``, drawn from the seed LoRA drew its own from, so
    they are what a run configured with these ranks starts from; the global RNG is not touched."""
    unfrozen = [p for n, p in module.named_parameters() if p.requires_grad and not n.endswith(ADAPTER_SUFFIXES)]
    for name, layer in lora_layers(module).items():
        replace_submodule(module, name, layer.base_layer)
    inject_lora(module, config_at_ranks(config, targets, ranks), torch.Generator().manual_seed(seed))
    for param in unfrozen:  # inject_lora freezes everything else; keep what another callback unfroze
        param.requires_grad_(True)


def touched_state(module: torch.nn.Module) -> Snapshot:
    """Copies of what trials may change besides the adapters: other trainable weights (a head some
    callback unfroze) and buffers (e.g. running statistics)."""
    tensors = [p for n, p in module.named_parameters() if p.requires_grad and not n.endswith(ADAPTER_SUFFIXES)]
    tensors += list(module.buffers())
    return [(tensor, tensor.detach().clone()) for tensor in tensors]


def restore(snapshot: Snapshot) -> None:
    """Put the copied tensors back and drop their gradients, so each trial starts where the fit would."""
    with torch.no_grad():
        for tensor, saved in snapshot:
            tensor.copy_(saved)
            tensor.grad = None


def add_importance(module: torch.nn.Module, importance: dict[str, torch.Tensor]) -> None:
    """Add this step's importance of each adapter's rank components to ``importance`` (by layer name)."""
    for name, layer in lora_layers(module).items():
        if layer.lora_A.grad is None or layer.lora_B.grad is None:
            continue
        value = component_importance(layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_A.grad, layer.lora_B.grad)
        importance[name] = importance[name] + value if name in importance else value
