"""The embedded fine-tuning task: arithmetic questions answered in a fixed format.

The base model saw arithmetic only as bare equations ("38 + 47 = 85") during pretraining. Here
the same facts are asked as questions ("Question: What is 38 plus 47?\\nAnswer: 85"), so the base
scores near zero until it adapts to the format: a genuine, measurable adaptation.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_sft.atomic_io import atomic_path


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    skill: str = ""


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"What is {a} plus {b}?", str(a + b)


def _sub(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randrange(100), rng.randrange(100)), reverse=True)
    return f"What is {a} minus {b}?", str(a - b)


def _max(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(100), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _next(rng: random.Random) -> tuple[str, str]:
    a = rng.randrange(10000)
    return f"What number comes after {a}?", str(a + 1)


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {"add": _add, "sub": _sub, "max": _max, "next": _next}


def format_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def generate_splits(num_train: int, num_val: int, num_test: int, seed: int = 0) -> dict[str, list[Example]]:
    """Disjoint train/val/test splits (no question appears in two splits), deterministic under ``seed``."""
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
    rng = random.Random(seed)
    skills = sorted(SKILLS)
    wanted = num_train + num_val + num_test
    seen: set[str] = set()
    examples: list[Example] = []
    attempts = 0
    while len(examples) < wanted:
        attempts += 1
        if attempts > 50 * wanted + 1000:
            raise ValueError(f"Cannot draw {wanted} distinct questions; ask for fewer examples.")
        skill = skills[len(examples) % len(skills)]
        question, answer = SKILLS[skill](rng)
        if question in seen:
            continue
        seen.add(question)
        examples.append(Example(format_prompt(question), f" {answer}", skill))
    return {
        "train": examples[:num_train],
        "val": examples[num_train : num_train + num_val],
        "test": examples[num_train + num_val :],
    }


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp, tmp.open("w") as handle:
        for example in examples:
            handle.write(json.dumps(asdict(example)) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read ``{"prompt": ..., "response": ...}`` lines (other fields ignored); errors name the line."""
    examples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            examples.append(Example(str(record["prompt"]), str(record["response"]), str(record.get("skill", ""))))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{number}: expected a JSON object with 'prompt' and 'response' fields ({err})."
            ) from None
    if not examples:
        raise ValueError(f"{path} holds no examples.")
    return examples
