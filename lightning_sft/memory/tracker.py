"""Counting the bytes of live tensors on any device, CPU included, and what autograd saves.

CUDA has ``torch.cuda.max_memory_allocated``; the CPU allocator keeps no statistics. ``LiveTensors``
sees every tensor an operator creates (a ``TorchDispatchMode``), counts each storage once, and
un-counts it when the storage is freed, so its peak is the allocator-level peak of a region of code
on any device. Pure torch: the measurement harness and the tests drive it.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_sft.recipes.offload import CopyTransfer


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage (views and in-place results share it)."""
    return tensor.untyped_storage()._cdata


@dataclass(frozen=True)
class Storage:
    serial: int  # unique for the tracker's life: storage addresses are reused after a free
    nbytes: int
    last_dim: int  # of the tensor that created it: tells logits (vocab wide) from the rest


def _aliasing_outputs(func: Any, count: int) -> set[int]:
    """Positions among the ``count`` flattened outputs that alias an input (views, in-place ops):
    they make no new storage. A list return (``split``) aliases as a whole."""
    returns = getattr(getattr(func, "_schema", None), "returns", ())
    aliased = [ret.alias_info is not None for ret in returns]
    if len(aliased) == count:
        return {i for i, alias in enumerate(aliased) if alias}
    return set(range(count)) if aliased and all(aliased) else set()


class LiveTensors(TorchDispatchMode):
    """Live storage bytes created inside the mode, their peak, and what was live at it.

    ``register`` adds storages that existed before (parameters, optimizer state, gradients) so they
    count towards ``live`` and can be named later. At each new peak the live storages are kept
    (``at_peak``), with whatever ``peak_probe`` returns then, so the peak can be broken down after
    the fact. ``to_host`` moves a storage to a second account (``host_live``, ``host_peak``): activation
    offloading's host copies, which on CPU share the one memory with everything else.
    """

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, Storage] = {}
        self.live = 0
        self.peak = 0
        self.at_peak: dict[int, Storage] = {}
        self.peak_extra: Any = None
        self.peak_probe: Callable[[], Any] | None = None
        self.host: dict[int, int] = {}
        self.host_live = 0
        self.host_peak = 0
        self._serials = itertools.count()

    def register(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self._track(tensor)

    def serial(self, tensor: torch.Tensor) -> int | None:
        """The serial of a live, tracked tensor's storage (None if untracked)."""
        found = self.storages.get(storage_key(tensor))
        return None if found is None else found.serial

    def snapshot(self) -> dict[int, Storage]:
        """The live storages by serial."""
        return {s.serial: s for s in self.storages.values()}

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.storages:
            return
        nbytes = storage.nbytes()
        self.storages[key] = Storage(next(self._serials), nbytes, tensor.shape[-1] if tensor.dim() else 1)
        self.live += nbytes
        weakref.finalize(storage, self._free, key, nbytes)
        if self.live > self.peak:
            self.peak = self.live
            self.at_peak = self.snapshot()
            if self.peak_probe is not None:
                self.peak_extra = self.peak_probe()

    def to_host(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage (created inside the mode) as host memory from now on."""
        key = storage_key(tensor)
        found = self.storages.pop(key, None)
        if found is None:
            raise ValueError("to_host takes a tensor created inside the tracker, once.")
        self.live -= found.nbytes
        self.host[key] = found.nbytes
        self.host_live += found.nbytes
        self.host_peak = max(self.host_peak, self.host_live)

    def _free(self, key: int, nbytes: int) -> None:
        if self.storages.pop(key, None) is not None:
            self.live -= nbytes
        elif self.host.pop(key, None) is not None:
            self.host_live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        flat = tree_flatten(out)[0]
        aliasing = _aliasing_outputs(func, len(flat))
        for i, tensor in enumerate(flat):
            if isinstance(tensor, torch.Tensor) and i not in aliasing:
                self._track(tensor)
        return out



class SavedForBackward:
    """Storages autograd saves for backward (``saved_tensors_hooks``), each counted once; parameter
    and buffer storages passed as ``exclude`` are not activations and are left out."""

    def __init__(self, exclude: Iterable[int] = ()) -> None:
        self.exclude = set(exclude)
        self.saved: dict[int, Storage] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in self.exclude and key not in self.saved:
            self.saved[key] = Storage(len(self.saved), tensor.untyped_storage().nbytes(), tensor.shape[-1] if tensor.dim() else 1)
        return tensor

    def __enter__(self) -> SavedForBackward:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def total(self) -> int:
        return sum(s.nbytes for s in self.saved.values())


class HostCopies(CopyTransfer):
    """Activation offloading's copies within CPU memory, which ``tracker`` (while one is set) counts as host
    memory: how the benchmarks measure offloading on a machine with no second memory."""

    def __init__(self) -> None:
        self.tracker: LiveTensors | None = None

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = super().to_host(tensor)
        if self.tracker is not None:
            self.tracker.to_host(host)
        return host

