"""The strategies each callback runs under, declared on the callback and checked in one place, and
``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` as plain FSDP2 data parallelism.

A callback declares ``strategies`` (the kinds below it supports) and ``strategy_refusal`` (why it
cannot run under the others). ``check_strategies`` reads the declarations of every callback of the
Trainer, so whichever of ours runs ``setup`` first refuses an unsupported combination before any of
them has changed the module.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    StrategyRegistry,
)

# Strategy kinds; the sharded ones hold each rank's part of the parameters outside the forward.
SINGLE, DDP, FSDP2, FSDP, DEEPSPEED = "single device", "DDP", "FSDP2", "FSDP", "DeepSpeed"
ALL_KINDS = frozenset({SINGLE, DDP, FSDP2, FSDP, DEEPSPEED})
UNSHARDED = frozenset({SINGLE, DDP})
SHARDED = ALL_KINDS - UNSHARDED
# Where a method may read whole weights outside the forward: FSDP1 holds flat shards there.
WHOLE_WEIGHTS = ALL_KINDS - {FSDP}
WHOLE_WEIGHTS_REFUSAL = (
    "it reads whole weights outside the forward (to {what}), and FSDP1 holds only flat shards of them there."
    " Use strategy='fsdp2', which shards each weight as a DTensor that is gathered where needed, or 'ddp'."
)


def strategy_kind(strategy: Any) -> str:
    """The kind of a Trainer's strategy; the class name for strategies none of ours knows."""
    name = type(strategy).__name__
    if name.startswith("DeepSpeed"):  # a DDPStrategy subclass that shards (ZeRO)
        return DEEPSPEED
    if isinstance(strategy, ModelParallelStrategy):
        return FSDP2
    if isinstance(strategy, FSDPStrategy):
        return FSDP
    if isinstance(strategy, DDPStrategy):
        return DDP
    if isinstance(strategy, SingleDeviceStrategy):
        return SINGLE
    return name


def check_strategies(trainer: pl.Trainer) -> None:
    """Refuse the Trainer's strategy if any callback declaring ``strategies`` does not support it, or
    tensor parallelism, which splits the weights our methods slice and read whole."""
    kind = strategy_kind(trainer.strategy)
    declared = [cb for cb in trainer.callbacks if isinstance(getattr(type(cb), "strategies", None), frozenset)]
    if declared and kind not in ALL_KINDS:
        names = ", ".join(sorted({type(cb).__name__ for cb in declared}))
        raise RuntimeError(
            f"{names} cannot tell how {kind} holds the module's weights: they run on one device and under"
            f" {', '.join(sorted(SHARDED | {DDP}))} (strategy='auto', 'ddp', 'fsdp2', 'fsdp', 'deepspeed_stage_N')."
        )
    for callback in declared:
        if kind not in type(callback).strategies:
            supported = ", ".join(k for k in sorted(ALL_KINDS) if k in type(callback).strategies)
            raise RuntimeError(
                f"{type(callback).__name__} does not run under {kind} ({type(trainer.strategy).__name__}):"
                f" {type(callback).strategy_refusal} It supports {supported}."
            )
    mesh = _device_mesh(trainer.strategy) if kind == FSDP2 and declared else None
    if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise RuntimeError(
            f"Tensor parallelism (tensor_parallel_size={mesh['tensor_parallel'].size()}) splits the weights that"
            f" {', '.join(type(cb).__name__ for cb in declared)} slice and read whole; shard with FSDP2 only:"
            " strategy='fsdp2' (FSDP2Strategy), or ModelParallelStrategy(data_parallel_size=<processes>,"
            " tensor_parallel_size=1)."
        )


def _device_mesh(strategy: ModelParallelStrategy) -> Any:
    """The strategy's mesh; None before its processes exist (the callbacks' setup always runs after)."""
    try:
        return strategy.device_mesh
    except RuntimeError:
        return None


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with every process in the data-parallel (FSDP2) dimension and none in
    the tensor-parallel one, registered as ``strategy="fsdp2"``.

    Lightning's default splits the processes of a node into tensor-parallel ranks, which a module that
    only calls ``fully_shard`` would leave unsharded. The module still shards itself in
    ``configure_model``: ``CausalLM`` does it by block (``lightning_sft.sharding.shard_by_block``), and
    so can any LightningModule.

    Example::

        trainer = Trainer(strategy="fsdp2", devices=2, callbacks=[LoRA()])
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def support_table(callbacks: list[type]) -> str:
    """The markdown matrix of which callback runs under which strategy kind, from their declarations."""
    kinds = [SINGLE, DDP, FSDP2, FSDP, DEEPSPEED]
    lines = ["| callback | " + " | ".join(kinds) + " | where refused, why |", "|---|" + "---|" * len(kinds) + "---|"]
    for callback in callbacks:
        supported = callback.strategies
        marks = " | ".join("yes" if kind in supported else "refused" for kind in kinds)
        lines.append(f"| `{callback.__name__}` | {marks} | {callback.strategy_refusal or ''} |")
    return "\n".join(lines)


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register(
        "fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) over every process, no tensor parallelism"
    )
