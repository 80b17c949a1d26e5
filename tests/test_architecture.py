"""The layering holds: the pure packages import without Lightning (each in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from generated_docs import check_generated

import lightning_sft.callbacks as public
from lightning_sft.callbacks.base import SFTCallback, compatibility_table

PURE = [
    "anatomy", "adapters", "sparse_ft", "memory", "recipes", "sparsity", "kernels", "layer_dropout.schedules",
    "rank_search", "sharding", "restore_point", "usage",
]


@pytest.mark.parametrize("package", PURE)
def test_a_pure_package_imports_without_lightning(package: str) -> None:
    code = f"import sys, lightning_sft.{package}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"lightning_sft.{package} loads {result.stdout.strip()}"


def test_the_root_names_load_on_first_use() -> None:
    code = "import sys, lightning_sft; before = 'lightning' in sys.modules; lightning_sft.LoRA; print(before, 'lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "True"], result.stderr[-2000:]


def test_every_callback_declares_what_it_goes_with_and_the_matrix_is_generated() -> None:
    callbacks = [getattr(public, name) for name in public.__all__]
    assert callbacks and all(issubclass(cls, SFTCallback) for cls in callbacks)
    names = {cls.__name__ for cls in callbacks}
    for cls in callbacks:  # every declaration names a callback that exists, with a reason
        for name, why in {**cls.excludes, **cls.requires}.items():
            assert name in names and why, (cls, name)
        for name, (setting, why) in cls.excludes_when.items():
            assert name in names and setting and why, (cls, name)
    check_generated("api.md", "compatibility table", compatibility_table(callbacks), "tests/test_architecture.py")
