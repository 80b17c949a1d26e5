"""Models shipped inside the package, addressable by name wherever a model directory is accepted."""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).parent
# name -> directory holding config.json, model.safetensors, the tokenizer and pretraining.json.
SHIPPED_MODELS: dict[str, Path] = {"sft-llama-5m": ASSETS_DIR / "sft-llama-5m"}


def resolve_model_dir(name_or_path: str) -> Path | None:
    """The directory of a shipped model name or of an existing local path; None if neither."""
    if name_or_path in SHIPPED_MODELS:
        return SHIPPED_MODELS[name_or_path]
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else None
