"""Activation offloading per block: what autograd saves inside a block's forward moves to host memory as it
is saved, and comes back for that block's backward.

Pure torch (no Lightning). ``OffloadedBlocks`` replaces each block's ``forward`` on the instance (as
checkpointing and layer dropout do) with one that runs under ``saved_tensors_hooks``. Packing a saved tensor
starts its copy to the host and lets the device copy go; in backward, the first unpack of a block brings the
whole block back and starts on the block before it, so one block is in use and one in flight. Left on the
device: tensors saved outside the blocks (the final norm, the loss), tensors under ``min_bytes`` (a norm's
per-token scale, LoRA's rank-``r`` intermediates), and the block's parameters and buffers (a saved weight is
the weight, not an activation). A tensor saved by several blocks (rotary cos/sin) is copied once per step.

Gradient checkpointing composes when it is installed beneath this (the callbacks arrange it in either order):
the checkpoint saves its block's inputs through these hooks, so what moves is each block's input, and the
recompute in backward runs on the device as before.

How bytes move is a ``Transfer``: ``StreamTransfer`` (CUDA) copies to pinned host memory on a side stream,
overlapping the copies with compute; ``CopyTransfer`` copies within CPU memory, which saves nothing and is how
the memory benchmark and the tests run this logic on a machine without an accelerator.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_sft.anatomy.modules import install_stamp, instance_forward, marked_forward, restore_forward
from lightning_sft.anatomy.stacks import find_stacks
from lightning_sft.validation import check_block_paths, check_int

# Smaller saved tensors stay on the device: a copy this small costs more in launch latency than it frees.
MIN_BYTES = 2**20
# Marks our forwards; the value is the instance attribute ``forward`` they replaced (None: the class's).
_MARK = "_lightning_sft_offloaded"


class Transfer(Protocol):
    """How saved tensors move between the device and the host."""

    def to_host(self, tensor: Tensor) -> Tensor:
        """A host copy of ``tensor`` (the copy may still be running); ``tensor`` may be freed after."""
        ...

    def to_device(self, tensors: list[Tensor], device: torch.device) -> tuple[list[Tensor], Any]:
        """Start copying ``tensors`` to ``device``: the copies and a handle for ``wait``."""
        ...

    def wait(self, handle: Any) -> None:
        """Make the computation wait until the copies of ``handle`` have arrived."""
        ...


class StreamTransfer:
    """CUDA: copies into pinned host memory and back on a side stream, ordered against the compute stream by
    waits and events, so they overlap the kernels of the blocks around them."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)

    def to_host(self, tensor: Tensor) -> Tensor:
        compute = torch.cuda.current_stream(tensor.device)
        host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(compute)  # the tensor has been computed
        with torch.cuda.stream(self.stream):
            host.copy_(tensor.detach(), non_blocking=True)
        tensor.record_stream(self.stream)  # its memory is not reused before the copy has read it
        return host

    def to_device(self, tensors: list[Tensor], device: torch.device) -> tuple[list[Tensor], Any]:
        with torch.cuda.stream(self.stream):
            copies = [t.to(device, non_blocking=True) for t in tensors]
            event = self.stream.record_event()
        return copies, (event, copies)

    def wait(self, handle: Any) -> None:
        event, copies = handle
        compute = torch.cuda.current_stream()
        compute.wait_event(event)
        for copy in copies:
            copy.record_stream(compute)  # allocated on the side stream, freed after the compute stream's use


class CopyTransfer:
    """CPU memory to CPU memory: synchronous copies, nothing saved. Runs the offloading logic where there is
    no accelerator (the tests, and ``lightning-sft bench memory``, which counts the host copies apart)."""

    def to_host(self, tensor: Tensor) -> Tensor:
        return tensor.detach().clone()

    def to_device(self, tensors: list[Tensor], device: torch.device) -> tuple[list[Tensor], Any]:
        return [t.clone() for t in tensors], None

    def wait(self, handle: Any) -> None:
        pass


@dataclass(eq=False)
class _Group:
    """The tensors one block forward offloaded; backward brings them back together."""

    previous: weakref.ref[_Group] | None  # the group saved before this one: backward reaches it next
    hosts: list[Tensor] = field(default_factory=list)
    uses: list[int] = field(default_factory=list)  # how many saved-tensor slots of this block read each one
    nbytes: list[int] = field(default_factory=lambda: [0])  # a cell, read by the finalizer
    copies: list[Tensor | None] | None = None  # brought back, until their last use
    left: list[int] = field(default_factory=list)  # uses still to come of each copy
    handle: Any = None
    arrived: bool = False
    started: bool = False  # backward has reached this block


@dataclass(frozen=True)
class _Packed:
    """What autograd keeps for an offloaded tensor: ``group`` holds it (``view``: offset, size and stride in a
    whole storage held); ``reader``: the block that saved it, when an earlier block's group holds it (then
    unpack fetches it by itself)."""

    group: _Group
    index: int
    view: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None
    reader: _Group | None = None


class ActivationOffloader:
    """The pack and unpack of saved tensors, per group (one block forward), and the host bytes they hold.

    Args:
        device: the device whose tensors move (by type: ``cuda`` or, with ``CopyTransfer``, ``cpu``).
        transfer: how they move (``StreamTransfer`` on CUDA).
        min_bytes: saved tensors smaller than this stay on the device.
    """

    def __init__(self, device: torch.device, transfer: Transfer, min_bytes: int = MIN_BYTES) -> None:
        self.device, self.transfer, self.min_bytes = torch.device(device), transfer, min_bytes
        self.host_bytes = 0  # held on the host now
        self.host_peak = 0  # the most held at once
        self.moved_bytes = 0  # copied to the host since the last ``reset_counts``
        self._last: weakref.ref[_Group] | None = None
        # Offloaded tensors by (storage, view) while their storage lives: a tensor saved again is not copied again.
        self._seen: dict[tuple[Any, ...], tuple[weakref.ref[_Group], int]] = {}

    def reset_counts(self) -> None:
        self.moved_bytes = 0
        self.host_peak = self.host_bytes

    @contextmanager
    def saving(self, block: nn.Module) -> Iterator[None]:
        """Offload what autograd saves inside this context as one group; ``block``'s parameters and buffers stay."""
        group = _Group(self._last)
        self._last = weakref.ref(group)
        weakref.finalize(group, self._released, group.nbytes)
        keep = {t.untyped_storage()._cdata for t in itertools.chain(block.parameters(), block.buffers())}

        def pack(tensor: Tensor) -> Tensor | _Packed:
            return self._pack(group, keep, tensor)

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            yield

    def _pack(self, group: _Group, keep: set[int], tensor: Tensor) -> Tensor | _Packed:
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type != self.device.type or nbytes < self.min_bytes or isinstance(tensor, nn.Parameter):
            return tensor
        storage = tensor.untyped_storage()
        if storage._cdata in keep:
            return tensor
        # Views of one storage (a linear's 2-D view of its 3-D input, attention's transposed output) are copied
        # once, as the whole storage, unless the view is the smaller part of it (one of q, k, v split from a
        # fused projection). Storage objects keep their identity while they live, so keys are not reused.
        geometry = (tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        whole = 2 * nbytes >= storage.nbytes()
        key = (storage._cdata, tensor.dtype) if whole else (storage._cdata, tensor.dtype, geometry)
        view = geometry if whole else None
        seen = self._seen.get(key)
        owner = seen[0]() if seen is not None else None
        if seen is not None and owner is not None:
            if owner is not group:
                return _Packed(owner, seen[1], view, reader=group)
            group.uses[seen[1]] += 1
            return _Packed(group, seen[1], view)
        source = _flat(tensor) if whole else tensor
        group.hosts.append(self.transfer.to_host(source))
        group.uses.append(1)
        index = len(group.hosts) - 1
        self._seen[key] = (weakref.ref(group), index)
        weakref.finalize(storage, self._seen.pop, key, None)
        moved = source.numel() * source.element_size()
        group.nbytes[0] += moved
        self.host_bytes += moved
        self.moved_bytes += moved
        self.host_peak = max(self.host_peak, self.host_bytes)
        return _Packed(group, index, view)

    def _unpack(self, packed: Tensor | _Packed) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        tensor = self._copy(packed)
        if packed.view is None:
            return tensor
        offset, size, stride = packed.view
        return tensor.as_strided(size, stride, offset)

    def _copy(self, packed: _Packed) -> Tensor:
        """The device copy of what ``packed`` points at (the whole storage, for a view)."""
        group, index = packed.group, packed.index
        self._start(packed.reader or group)
        if packed.reader is not None or group.copies is None or group.copies[index] is None:
            # another block's tensor, or one used up already (a retained graph's second backward)
            copies, handle = self.transfer.to_device([group.hosts[index]], self.device)
            self.transfer.wait(handle)
            return copies[0]
        if not group.arrived:
            self.transfer.wait(group.handle)
            group.arrived = True
        tensor = group.copies[index]
        group.left[index] -= 1
        if group.left[index] == 0:
            group.copies[index] = None  # the device copy goes when autograd is done with it
        return tensor

    def _start(self, group: _Group) -> None:
        """Backward has reached ``group``'s block: have it on the way, and the block before it too."""
        if group.started:
            return
        group.started = True
        if group.copies is None:
            self._fetch(group)
        previous = group.previous() if group.previous is not None else None
        if previous is not None and previous.copies is None:
            self._fetch(previous)  # in flight while this block's backward runs

    def _fetch(self, group: _Group) -> None:
        copies, group.handle = self.transfer.to_device(group.hosts, self.device)
        group.copies, group.left = list(copies), list(group.uses)

    def _released(self, nbytes: list[int]) -> None:
        self.host_bytes -= nbytes[0]


def _flat(tensor: Tensor) -> Tensor:
    """The whole storage under ``tensor``, as a 1-D tensor of its dtype."""
    storage = tensor.untyped_storage()
    return tensor.new_empty(0).set_(storage, 0, (storage.nbytes() // tensor.element_size(),), (1,))


class OffloadedBlocks:
    """Each block's forward, while it records gradients, under one ``ActivationOffloader`` (a forward wrapper:
    ``install`` wraps the forwards the blocks have now, ``remove`` puts back the ones it found)."""

    def __init__(self, blocks: list[tuple[str, nn.Module]], offloader: ActivationOffloader) -> None:
        self.blocks, self.offloader = blocks, offloader
        self.installed = False
        self.installed_at = 0  # install_stamp() of the last install

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def install(self) -> None:
        if self.installed:
            return
        for _, block in self.blocks:
            block.forward = _offloaded(block, block.forward, instance_forward(block), self.offloader)
        self.installed = True
        self.installed_at = install_stamp()

    def remove(self) -> None:
        for _, block in self.blocks:
            forward = marked_forward(block, _MARK)
            if forward is not None:
                restore_forward(block, forward.__dict__[_MARK])
        self.installed = False


def _offloaded(block: nn.Module, forward: Callable[..., Any], previous: Any, offloader: ActivationOffloader) -> Callable[..., Any]:
    def offloaded_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        with offloader.saving(block):
            return forward(*args, **kwargs)

    offloaded_forward.__dict__[_MARK] = previous
    return offloaded_forward


def offload_activations(
    model: nn.Module,
    device: torch.device | str,
    transfer: Transfer | None = None,
    min_bytes: int = MIN_BYTES,
    blocks: Sequence[str] | None = None,
) -> OffloadedBlocks:
    """Offload what every block of ``model`` saves for backward; ``remove()`` on the result undoes it.

    ``device`` is where the blocks compute; ``transfer`` defaults to ``StreamTransfer`` on CUDA (another
    device needs an explicit one). ``blocks`` names the ``nn.ModuleList`` stacks (dotted paths); by default
    they are found by structure (``find_stacks``). Everything is checked before a forward changes.
    """
    device = torch.device(device)
    check_int(min_bytes, "min_bytes", 0, f"The default {MIN_BYTES} keeps tensors under 1 MiB.")
    blocks = check_block_paths(blocks)
    if transfer is None:
        if device.type != "cuda":
            raise ValueError(
                f"Activation offloading copies from an accelerator to host memory; on {device.type} pass a `transfer`"
                " (CopyTransfer runs the logic in CPU memory, saving nothing)."
            )
        transfer = StreamTransfer(device)
    targets = [(f"{name}.{i}", block) for name, stack in find_stacks(model, blocks) for i, block in enumerate(stack)]
    for name, block in targets:
        if marked_forward(block, _MARK) is not None:
            raise ValueError(f"Activation offloading is already installed on {name!r}; call remove() on the first one.")
    wrapper = OffloadedBlocks(targets, ActivationOffloader(device, transfer, min_bytes))
    wrapper.install()
    return wrapper
