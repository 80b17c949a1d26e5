"""A restore point of a module: what it holds, by reference, so that changes made to it can be undone exactly.

Pure torch (no Lightning). Every change this package makes to a user's module before training is a
change of references, never of a tensor's values: a submodule replaced (LoRA, sparse deltas, 4-bit
layers), an instance ``forward`` installed (sparsity, layer dropout, checkpointing), a hook registered,
a ``requires_grad`` flag or a config value set, a module's class swapped (FSDP2). So the restore
point keeps each module's attributes and the contents of its registries (parameters, buffers,
submodules, hooks), every parameter's flag and gradient, and the attributes of the modules' configs
and of any other objects named (the callbacks' own state); ``restore`` puts all of it back. Tensor
values changed in place are not tracked: nothing here changes them before training.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from torch import Tensor, nn

_CONTAINERS = (dict, list, set)


class _Snapshot:
    """One object's class, attributes and the contents of its mutable containers."""

    def __init__(self, obj: Any, keep: Collection[str] = ()) -> None:
        self.obj, self.cls, self.keep = obj, type(obj), keep
        self.attrs = dict(vars(obj))
        self.contents = {key: value.copy() for key, value in self.attrs.items() if isinstance(value, _CONTAINERS)}

    def restore(self) -> None:
        current = vars(self.obj)
        for key in [key for key in current if key not in self.attrs and key not in self.keep]:
            del current[key]
        for key, value in self.attrs.items():
            if key in self.keep:
                continue
            current[key] = value
            if key in self.contents:
                _refill(value, self.contents[key])
        if type(self.obj) is not self.cls:
            self.obj.__class__ = self.cls


def _refill(container: Any, saved: Any) -> None:
    """Put ``saved`` back into ``container`` itself, so whoever holds the container sees it restored."""
    if isinstance(container, list):
        container[:] = saved
    else:
        container.clear()
        container.update(saved)


class RestorePoint:
    """Everything ``module`` (and ``others``) hold by reference now; ``restore()`` returns them to it.

    Args:
        module: the root module; every submodule, parameter and ``config`` attribute below it is kept.
        others: further objects whose attributes are kept (e.g. the callbacks that change the module).
        keep_root: attribute names of ``module`` that are not restored (a framework's bookkeeping on the
            root, e.g. Lightning's trainer reference, which the framework keeps updating itself).
    """

    def __init__(self, module: nn.Module, others: Iterable[object] = (), keep_root: Collection[str] = ()) -> None:
        modules = list(module.modules())
        configs = {id(c): c for m in modules if hasattr(c := getattr(m, "config", None), "__dict__")
                   and not isinstance(c, (nn.Module, Tensor))}
        self._snapshots = [_Snapshot(module, keep_root)] + [_Snapshot(m) for m in modules[1:]]
        self._snapshots += [_Snapshot(c) for c in configs.values()] + [_Snapshot(o) for o in others]
        params = {id(p): p for m in modules for p in m._parameters.values() if p is not None}
        self._flags = [(p, p.requires_grad, p.grad) for p in params.values()]

    def restore(self) -> None:
        for snapshot in self._snapshots:
            snapshot.restore()
        for param, requires_grad, grad in self._flags:
            param.requires_grad_(requires_grad)
            param.grad = grad
