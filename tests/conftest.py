"""Fixtures shared by the test modules, and the one place their shared helpers live (``tests/helpers``).

The tests mirror the package (``tests/<subpackage>/test_*.py``); the modules of ``tests/helpers`` (tiny
models, the 2-process scripts, generated-docs checks) are importable from every test by their names.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "helpers"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls: one intra-op thread is as fast when the machine is idle and avoids 100x slowdowns
    from thread oversubscription when it is not. Every run of a test shares it, so comparisons hold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
