"""The layering holds: the pure packages import without Lightning (each in a fresh interpreter)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from generated_docs import check_generated

import lightning_sft
import lightning_sft.callbacks as public
from lightning_sft.callbacks.base import SFTCallback, compatibility_table

PURE = [
    "anatomy", "adapters", "losses", "sparse_ft", "memory", "recipes", "sparsity", "kernels", "layer_dropout.schedules",
    "rank_search", "sharding", "restore_point", "usage",
    # the command line's registry and the subcommands that train nothing start without Lightning
    "cli", "cli.plan", "cli.diff", "cli.report",
]


@pytest.mark.parametrize("package", PURE)
def test_a_pure_package_imports_without_lightning(package: str) -> None:
    code = f"import sys, lightning_sft.{package}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"lightning_sft.{package} loads {result.stdout.strip()}"


def test_no_callback_imports_another_callback_module() -> None:
    """Callbacks know each other only through their declarations (``excludes``, ``requires``, ``forward_wrappers``)."""
    folder = Path(public.__file__).parent
    shared = {"__init__", "base", "side_loop"}
    callback_modules = {path.stem for path in folder.glob("*.py")} - shared
    assert len(callback_modules) >= 9
    for stem in sorted(callback_modules):
        tree = ast.parse((folder / f"{stem}.py").read_text())
        run_time = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]  # not under TYPE_CHECKING
        imported = {node.module for node in run_time if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in run_time if isinstance(node, ast.Import) for alias in node.names}
        others = {name for name in imported if name.rsplit(".", 1)[-1] in callback_modules and "callbacks" in name}
        assert not others, f"callbacks/{stem}.py imports {sorted(others)}"


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


def test_the_tests_mirror_the_package_and_share_helpers_from_one_place() -> None:
    tests = Path(__file__).parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and p.name not in ("helpers", "__pycache__")}
    packages = {p.name for p in Path(lightning_sft.__file__).parent.iterdir() if (p / "__init__.py").is_file()}
    assert folders and folders <= packages, f"test folders without a subpackage: {sorted(folders - packages)}"
    stray = [str(p.relative_to(tests)) for p in tests.rglob("*.py")
             if not p.name.startswith("test_") and p.name != "conftest.py" and p.parent.name != "helpers"]
    assert not stray, f"shared test code belongs in tests/helpers: {stray}"
