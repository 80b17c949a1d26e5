"""Argument checks shared by the callbacks and their pure-logic modules (no Lightning)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def check_int(value: Any, name: str, low: int, hint: str) -> int:
    """``value`` if it is an int (not a bool) >= ``low``; else a ValueError naming ``name`` with ``hint``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}; got {value!r}. {hint}")
    return value


def check_block_paths(blocks: Any) -> list[str] | None:
    """``blocks`` as a list of dotted paths of block stacks (None: found by structure); else a ValueError."""
    if blocks is not None and (isinstance(blocks, str) or not all(isinstance(b, str) for b in blocks)):
        raise ValueError(f"`blocks` must be a list of dotted module paths such as ['model.layers']; got {blocks!r}.")
    return list(blocks) if blocks is not None else None


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a bad size is a usage error up front, not a traceback after the model is built."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {value}")
        return value

    return parse
