"""Replacing a submodule of a user's model by its dotted name (how adapters and sparse deltas go in)."""

from __future__ import annotations

from torch import nn


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.get_submodule(name)`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
