"""Capturing and restoring the global random number generators (torch CPU and CUDA, Python, NumPy).

The rank search rewinds them to their state at fit start: every trial sees the same data order and
dropout draws, and the fit afterwards draws what it would have drawn without the trials.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """Every global generator's state. CUDA's only when CUDA is initialized: querying it would
    initialize CUDA, and a CUDA generator nobody has used yet is still at its seeded state."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what ``capture_rng`` recorded (generators it did not record are left alone)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
