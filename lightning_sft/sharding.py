"""Sharded parameters: sharding a model block by block for FSDP2, and whole tensors where a method
needs a weight outside the forward (building estimators, choosing entries, saving adapters and diffs).

Pure torch (no Lightning). Outside its forward an FSDP2 (``fully_shard``) module holds each parameter
as a DTensor sharded over dim 0; inside the forward (and backward) of the sharded unit the parameters
are plain full tensors again, so forwards written for plain tensors keep working. What runs outside a
forward gets full tensors from ``unsharded``; DeepSpeed ZeRO-3 partitions (``ds_id``) are gathered with
``deepspeed.zero.GatheredParameters``, the same contract. FSDP1 keeps flat shards outside the forward
that only its own ``summon_full_params`` undoes, for a whole unit at a time (``fsdp1_full_parameters``).
Every function here that gathers is a collective: call it on every rank, in the same order.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def _is_dtensor(tensor: object) -> bool:
    """An FSDP2 DTensor? Asked without importing ``torch.distributed.tensor`` (0.7 s), which whoever made a
    DTensor has imported already."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds only a part of its values on this rank (FSDP2 DTensor or ZeRO-3 partition)."""
    return _is_dtensor(tensor) or hasattr(tensor, "ds_id")


def has_sharded_parameters(module: nn.Module) -> bool:
    return any(is_sharded(param) for param in module.parameters())


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole of ``tensor`` as a plain tensor on every rank (a collective when it is sharded)."""
    if _is_dtensor(tensor):
        return tensor.full_tensor()
    if hasattr(tensor, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.data.clone()
    return tensor


def write_full(tensor: Tensor, values: Tensor) -> None:
    """Set ``tensor`` (plain or an FSDP2 DTensor) to the full ``values``, which every rank passes alike."""
    with torch.no_grad():
        if _is_dtensor(tensor):
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(values.to(tensor.dtype), tensor.device_mesh, tensor.placements).to_local()
            tensor.to_local().copy_(local)
        else:
            tensor.copy_(values)


def local_numel(tensor: Tensor) -> int:
    """Elements of ``tensor`` stored on this rank."""
    if _is_dtensor(tensor):
        return tensor.to_local().numel()
    if hasattr(tensor, "ds_tensor"):  # a ZeRO-3 partition
        return tensor.ds_tensor.numel()
    return tensor.numel()


@contextmanager
def unsharded(modules: nn.Module | Iterable[nn.Module], writeback: bool = False) -> Iterator[None]:
    """Inside, every parameter of ``modules`` (recursively) is a plain full tensor; with ``writeback`` the
    changes made to them are kept on exit (every rank must make the same ones). Nothing is gathered for
    modules that are not sharded, so this costs nothing on one device or under DDP."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    owners: list[tuple[nn.Module, str, Tensor]] = []
    zero3: list[Tensor] = []
    seen: set[int] = set()
    for root in roots:
        for module in root.modules():
            for name, param in module._parameters.items():
                if param is None:
                    continue
                if _is_dtensor(param):
                    owners.append((module, name, param))
                elif hasattr(param, "ds_id") and id(param) not in seen:
                    zero3.append(param)
                seen.add(id(param))
    with ExitStack() as stack:
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if writeback else None))
        gathered: dict[int, nn.Parameter] = {}
        for module, name, param in owners:
            if id(param) not in gathered:  # a tied parameter is gathered once
                gathered[id(param)] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
            module._parameters[name] = gathered[id(param)]
        try:
            yield
        finally:
            written: set[int] = set()
            for module, name, param in owners:
                if writeback and id(param) not in written:
                    write_full(param, gathered[id(param)].detach())
                    written.add(id(param))
                module._parameters[name] = param


@contextmanager
def fsdp1_full_parameters(root: nn.Module) -> Iterator[None]:
    """Inside, the FSDP1 (``FullyShardedDataParallel``) units under ``root`` hold their parameters whole on
    every rank (FSDP1 keeps flat shards outside the forward); nothing happens without FSDP1 units."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not any(isinstance(module, FullyShardedDataParallel) for module in root.modules()):
        yield
        return
    with FullyShardedDataParallel.summon_full_params(root, writeback=False):
        yield


@contextmanager
def first_rank_writes(sharded: bool) -> Iterator[bool]:
    """Yields whether this process writes a file built from gathered tensors: every caller when nothing is
    sharded (each holds it all, as before), else rank 0 only, the others waiting until it has written."""
    if not sharded or not torch.distributed.is_initialized():
        yield True
        return
    try:
        yield torch.distributed.get_rank() == 0
    finally:
        torch.distributed.barrier()


def shard_by_block(
    model: nn.Module, mesh: Any, blocks: Sequence[nn.Module] | None = None, **fully_shard_options: Any
) -> int:
    """FSDP2-shard ``model``: each block of its block stacks (found by structure, or ``blocks``) is one
    unit, whose weights are gathered for its forward and freed after, then the root holds the rest
    (embeddings, head, norms). Call it in ``configure_model`` after the callbacks' ``setup`` changed the
    module (adapters, sparse deltas and checkpointed forwards are sharded with it); returns the units."""
    from torch.distributed.fsdp import fully_shard

    from lightning_sft.anatomy.stacks import find_stacks

    units = list(blocks) if blocks is not None else [block for _, stack in find_stacks(model) for block in stack]
    for unit in units:
        fully_shard(unit, mesh=mesh, **fully_shard_options)
    fully_shard(model, mesh=mesh, **fully_shard_options)
    return len(units) + 1


def rank_bytes(module: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()) -> dict[str, int]:
    """Bytes this rank stores of ``module``'s parameters (trainable and frozen) and of the optimizers' states."""
    trainable = sum(local_numel(p) * p.element_size() for p in module.parameters() if p.requires_grad)
    frozen = sum(local_numel(p) * p.element_size() for p in module.parameters() if not p.requires_grad)
    states = sum(
        local_numel(value) * value.element_size()
        for optimizer in optimizers
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor) and value.ndim > 0
    )
    return {"trainable": trainable, "frozen": frozen, "optimizer": states}
