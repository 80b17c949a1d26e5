"""Putting sparse-delta layers into a model: the targeted linear layers wrapped, everything else frozen."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_sft.adapters.targeting import ALL_LINEAR, select_targets
from lightning_sft.anatomy.modules import replace_submodule
from lightning_sft.sparse_ft.delta_layer import SparseDeltaLinear
from lightning_sft.sparse_ft.selection import entry_count


def inject_sparse_deltas(
    root: nn.Module,
    density: float,
    selection: str,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    exclude_modules: str | Sequence[str] | None = None,
) -> list[str]:
    """Wrap the targeted linear layers of ``root`` in ``SparseDeltaLinear`` and freeze everything else.

    All checks run and all wrappers are built before the first swap, so a bad target leaves
    ``root`` untouched. The wrappers' indices are placeholders until a selection fills them.
    """
    targets = select_targets(root, target_modules, exclude_modules)
    owners: dict[int, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{name}.{param_name}" if name else param_name)
    for name in targets:
        shared = owners[id(root.get_submodule(name).weight)]
        if len(shared) > 1:
            raise ValueError(
                f"{name!r} shares its weight with {', '.join(s for s in shared if s != name + '.weight')} (tied weights);"
                " a sparse delta on one would not reach the other. Exclude it with `exclude_modules`."
            )
    built = {}
    for name in targets:
        layer = root.get_submodule(name)
        built[name] = SparseDeltaLinear(layer, entry_count(layer.weight.numel(), density), selection)
    for param in root.parameters():
        param.requires_grad_(False)
    for name, layer in built.items():
        replace_submodule(root, name, layer)
        layer.delta_values.requires_grad_(True)
    return list(built)
