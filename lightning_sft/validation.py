"""Argument checks shared by the callbacks and their pure-logic modules (no Lightning)."""

from __future__ import annotations

from typing import Any


def check_int(value: Any, name: str, low: int, hint: str) -> int:
    """``value`` if it is an int (not a bool) >= ``low``; else a ValueError naming ``name`` with ``hint``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}; got {value!r}. {hint}")
    return value
