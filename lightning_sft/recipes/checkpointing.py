"""Per-block activation checkpointing for any model: each residual block keeps only its inputs for the
backward pass and runs its forward again there, one block at a time.

Pure torch (no Lightning). Like ``LayerDropper``, a block's ``forward`` is replaced on the instance, so
parameter names, ``state_dict`` keys, hooks and adapters are unchanged, and module hooks of the block
itself run once (outside the checkpoint); ``disable_gradient_checkpointing`` puts the previous forward
back. The checkpoint is ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` with the RNG state
preserved, so dropout draws the same masks in the recompute and the gradients equal those without
checkpointing.

Side effects of a block's forward must not happen twice. Handled here:

* Hugging Face KV caches (``transformers`` ``Cache`` objects) are written by the forward and would be
  written again by the recompute, so a checkpointed training forward gets no cache (``use_cache=False``),
  as with Hugging Face's own checkpointing; a filled cache is refused. Evaluation and no-grad forwards
  keep theirs.
* Contextual sparsity (``SparsityState``): the recompute reuses the channels the forward chose (a
  seeded random estimator would draw new ones), adds nothing to calibration statistics and leaves the
  step's skipped-FLOP total as the forward left it.
* Layer dropout must decide outside the checkpoint: install checkpointing first, or use the callbacks,
  which arrange that in either order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_sft.anatomy.modules import instance_forward, marked_forward, restore_forward
from lightning_sft.anatomy.stacks import find_stacks
from lightning_sft.sparsity.sparsify import sparse_blocks
from lightning_sft.sparsity.state import SparsityState
from lightning_sft.validation import check_block_paths

# Marks our forwards; the value is the instance attribute ``forward`` they replaced (None: the class's).
_MARK = "_lightning_sft_checkpointed"


def enable_gradient_checkpointing(model: nn.Module, blocks: Sequence[str] | None = None) -> list[str]:
    """Run every block of ``model`` under activation checkpointing during training; returns the block names.

    ``blocks`` names the ``nn.ModuleList`` stacks (dotted paths); by default they are found by structure
    (``find_stacks``: ``model.layers`` of LLaMA-likes, ``transformer.h`` of GPT-2, any list of blocks).
    Everything is checked before the first block changes, so an error leaves ``model`` as it was.
    """
    check_block_paths(blocks)
    targets: dict[int, tuple[str, nn.Module]] = {}
    for stack_name, stack in find_stacks(model, blocks):
        for index, block in enumerate(stack):
            name = f"{stack_name}.{index}"
            if marked_forward(block, _MARK) is not None:
                raise ValueError(
                    f"Gradient checkpointing is already enabled on {name!r}; call disable_gradient_checkpointing(model)"
                    " before enabling it again."
                )
            if getattr(block, "gradient_checkpointing", False) is True:
                raise ValueError(
                    f"{name!r} already runs Hugging Face's activation checkpointing"
                    " (activation_checkpointing_enable()); use one of the two: call"
                    " model.activation_checkpointing_disable() first."
                )
            if id(block) in targets:
                raise ValueError(f"{name!r} is the same block as {targets[id(block)][0]!r}; name each stack once.")
            targets[id(block)] = (name, block)
    for name, block in targets.values():
        inner = next((targets[id(sub)][0] for sub in block.modules() if sub is not block and id(sub) in targets), None)
        if inner is not None:
            raise ValueError(f"{inner!r} lies inside {name!r}; checkpoint the outer stack only.")
    for name, block in targets.values():
        block.forward = _checkpointed(block, block.forward, instance_forward(block))
    return [name for name, _ in targets.values()]


def disable_gradient_checkpointing(model: nn.Module) -> list[str]:
    """Put back the forward each checkpointed block of ``model`` had; returns their names ([] if none)."""
    restored = []
    for name, module in model.named_modules():
        forward = marked_forward(module, _MARK)
        if forward is None:
            continue
        restore_forward(module, forward.__dict__[_MARK])
        restored.append(name)
    return restored


def _checkpointed(block: nn.Module, forward: Callable[..., Any], previous: Any) -> Callable[..., Any]:
    """``forward`` under a checkpoint while ``block`` trains with gradients; marked with ``previous``
    (the instance forward it replaces) for ``disable_gradient_checkpointing``."""

    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        args, kwargs = _without_caches(args, kwargs)
        replay = _SparsityReplay(block)
        calls = 0

        def run(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            with replay.record() if calls == 1 else replay.replay():
                return forward(*args, **kwargs)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    checkpointed_forward.__dict__[_MARK] = previous
    return checkpointed_forward


def _cache_types() -> tuple[type, ...]:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # no transformers: no HF caches to meet
        return ()
    return (Cache,)


def _without_caches(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` with empty HF cache objects replaced by None (and ``use_cache=False`` then).

    Training forwards of HF models get an empty cache by default (``config.use_cache``); it would only
    be returned, filled with this step's keys, so nothing of the step is lost. A filled cache is refused:
    dropping it would change what the block attends to."""
    types = _cache_types()
    caches = [value for value in (*args, *kwargs.values()) if types and isinstance(value, types)]
    if not caches:
        return args, kwargs
    if any(cache.get_seq_length() > 0 for cache in caches):
        raise RuntimeError(
            "Gradient checkpointing cannot train on a filled KV cache: the recompute in the backward pass would"
            " extend it a second time. Pass past_key_values=None in training forwards, or disable checkpointing."
        )
    args = tuple(None if isinstance(value, types) else value for value in args)
    kwargs = {key: None if isinstance(value, types) else value for key, value in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _sparsity_states(block: nn.Module) -> list[SparsityState]:
    """The ``SparsityState``s read inside ``block``: those of its sparse blocks."""
    states = {id(sparse.state): sparse.state for sparse in sparse_blocks(block)}
    return list(states.values())


class _SparsityReplay:
    """The channel choices of one checkpointed forward, recorded in the forward and replayed in its
    recompute, so both run the same sparse computation whatever the estimator, calibration statistics
    see each token once, and skipped FLOPs are counted once per step (by the forward, for forward and
    backward), as without checkpointing."""

    def __init__(self, block: nn.Module) -> None:
        self.states = _sparsity_states(block)
        self.choices: list[tuple[int, int, Tensor]] = []

    @contextmanager
    def record(self) -> Iterator[None]:
        for state in self.states:
            state.select = partial(self._record, SparsityState.select.__get__(state))
        try:
            yield
        finally:
            for state in self.states:
                del state.select

    def _record(self, select: Callable[..., Tensor], estimator: Any, x: Tensor, k: int, mask: Tensor) -> Tensor:
        idx = select(estimator, x, k, mask)
        self.choices.append((id(estimator), k, idx))
        return idx

    @contextmanager
    def replay(self) -> Iterator[None]:
        choices = iter(self.choices)
        totals = [state.skipped_flops for state in self.states]
        for state in self.states:
            state.select = partial(self._replay, choices)
            state.observe = _ignore
        try:
            yield
        finally:
            for state, total in zip(self.states, totals):
                del state.select, state.observe
                state.skipped_flops = total

    @staticmethod
    def _replay(choices: Iterator[tuple[int, int, Tensor]], estimator: Any, x: Tensor, k: int, mask: Tensor) -> Tensor:
        recorded = next(choices, None)
        if recorded is None or recorded[:2] != (id(estimator), k):
            raise RuntimeError(
                "Gradient checkpointing: the recompute of a sparse block asked for channels the forward did not"
                " choose (the block's control flow changed between forward and backward). Do not change"
                " ContextualSparsity's state or keep counts between a forward and its backward."
            )
        return recorded[2]


def _ignore(*args: Any) -> None:
    """``SparsityState.observe`` during a recompute: the forward already added these tokens."""
