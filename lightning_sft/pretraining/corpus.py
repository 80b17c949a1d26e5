"""The offline pretraining corpus: Python's own documentation plus generated number text.

Everything comes from the Python standard library or from seeded generators, so the corpus is
rebuilt identically on any machine with the same Python minor version, with no download.
"""

from __future__ import annotations

import importlib
import inspect
import random
import sys
import warnings

# Modules whose import has side effects (GUI, network, this-module jokes) or that only exist on
# some platforms; their documentation is not needed.
_SKIP_MODULES = frozenset(
    {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "venv", "test",
     "msilib", "winreg", "winsound", "msvcrt", "_winapi", "nt", "pydoc_data"}
)


def pydoc_topics() -> list[str]:
    """The language reference topics that ``help()`` shows, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_docstrings() -> list[str]:
    """Docstrings of stdlib modules, classes and functions, deduplicated, in a fixed order."""
    seen: set[str] = set()
    docs: list[str] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules simply do not contribute
            continue
        for _, obj in sorted(inspect.getmembers(module), key=lambda item: item[0]):
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def number_text(n_lines: int, seed: int) -> list[str]:
    """Arithmetic and counting written as plain equations, so the base model knows numbers.

    The fine-tuning task asks the same facts as questions; the base has to adapt to that format.
    """
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        kind = rng.randrange(4)
        a, b = rng.randrange(100), rng.randrange(100)
        if kind == 0:
            lines.append(f"{a} + {b} = {a + b}")
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            lines.append(f"{a} - {b} = {a - b}")
        elif kind == 2:
            lines.append(f"{max(a, b)} > {min(a, b)}" if a != b else f"{a} = {b}")
        else:
            start = rng.randrange(1000)
            lines.append(", ".join(str(start + i) for i in range(rng.randrange(3, 7))))
    return lines


def build_corpus(number_lines: int = 200_000, seed: int = 0) -> list[str]:
    """Documents of the corpus, shuffled with ``seed``; number lines come in paragraphs of 20."""
    numbers = number_text(number_lines, seed)
    documents = pydoc_topics() + stdlib_docstrings()
    documents += ["\n".join(numbers[i : i + 20]) for i in range(0, len(numbers), 20)]
    random.Random(seed).shuffle(documents)
    return documents
