"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls: one intra-op thread is as fast when the machine is idle and avoids 100x slowdowns
    from thread oversubscription when it is not. Every run of a test shares it, so comparisons hold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
