"""Changing a user's model by reference: replacing a submodule by its dotted name (how adapters and sparse
deltas go in), and putting back the instance ``forward`` a wrapper replaced (how sparse blocks, layer
dropout, checkpointing and the fused loss come out)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from torch import nn


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.get_submodule(name)`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def instance_forward(module: nn.Module) -> Callable[..., Any] | None:
    """The ``forward`` set on ``module`` itself, or None when it runs its class's: what to put back later."""
    return module.__dict__.get("forward")


def marked_forward(module: nn.Module, mark: str) -> Callable[..., Any] | None:
    """``module``'s instance forward if a wrapper installed it with ``mark`` in its ``__dict__`` (the wrapper
    stores there the forward it replaced), else None."""
    forward = instance_forward(module)
    return forward if mark in getattr(forward, "__dict__", {}) else None


def restore_forward(module: nn.Module, previous: Callable[..., Any] | None) -> None:
    """Put back the ``instance_forward`` taken before a wrapper was set (None: the class's forward again)."""
    if previous is None:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = previous


_STAMPS = itertools.count(1)


def install_stamp() -> int:
    """A number larger than every one before it: forward wrappers stamp their installs with it, so the ones
    installed later (further out) can come off first."""
    return next(_STAMPS)
