"""Choosing which layers get adapters, by structure rather than by a table of model names."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from lightning_sft.anatomy.linear import is_supported_linear

ALL_LINEAR = "all-linear"
TargetSpec = str | Sequence[str]


def validate_target_spec(spec: TargetSpec | None, argument: str) -> None:
    """Reject malformed target specifications before anything touches a model."""
    if spec is None:
        return
    if isinstance(spec, str):
        if spec != ALL_LINEAR:
            try:
                re.compile(spec)
            except re.error as err:
                raise ValueError(
                    f"`{argument}={spec!r}` is not a valid regular expression ({err}). Pass 'all-linear',"
                    " a list of module-name suffixes such as ['q_proj', 'v_proj'], or a valid regex."
                ) from None
        return
    if not isinstance(spec, Sequence) or not spec or not all(isinstance(s, str) and s for s in spec):
        raise ValueError(
            f"`{argument}` must be 'all-linear', a regex string, or a non-empty list of module-name suffixes;"
            f" got {spec!r}."
        )


def matches_spec(name: str, spec: TargetSpec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in spec)


def output_head_names(root: nn.Module) -> set[str]:
    """Names of output heads: HF models' output embeddings and any linear tied to an embedding."""
    ids_to_names = {id(module): name for name, module in root.named_modules()}
    heads: set[str] = set()
    for module in root.modules():
        get_output_embeddings = getattr(module, "get_output_embeddings", None)
        if callable(get_output_embeddings) and hasattr(module, "config"):
            head = get_output_embeddings()
            if isinstance(head, nn.Module) and id(head) in ids_to_names:
                heads.add(ids_to_names[id(head)])
    embedding_weights = {id(m.weight) for m in root.modules() if isinstance(m, nn.Embedding)}
    for name, module in root.named_modules():
        if is_supported_linear(module) and id(module.weight) in embedding_weights:
            heads.add(name)
    return heads


def _is_inside_adapter(name: str) -> bool:
    return name.endswith(".base_layer") or ".base_layer." in name


def select_targets(root: nn.Module, target_modules: TargetSpec, exclude_modules: TargetSpec | None) -> list[str]:
    """Names (relative to ``root``) of the layers to adapt; raises before any change on a bad match."""
    linear_names = [n for n, m in root.named_modules() if is_supported_linear(m) and not _is_inside_adapter(n)]
    if target_modules == ALL_LINEAR:
        heads = output_head_names(root)
        selected = [n for n in linear_names if n not in heads]
    else:
        matched = [(n, m) for n, m in root.named_modules() if n and matches_spec(n, target_modules)]
        matched = [(n, m) for n, m in matched if not _is_inside_adapter(n)]
        # Parameter-free matches (activations, dropout) are harmless; anything holding weights is not.
        unsupported = [
            f"{n} ({type(m).__name__})"
            for n, m in matched
            if not is_supported_linear(m) and next(m.parameters(), None) is not None
        ]
        if unsupported:
            raise TypeError(
                f"`target_modules={target_modules!r}` matches layers LoRA cannot adapt: {', '.join(unsupported[:5])}."
                " LoRA supports nn.Linear and transformers Conv1D; target their linear children instead"
                f" (for example {_suffix_examples(linear_names)})."
            )
        selected = [n for n, m in matched if is_supported_linear(m)]
    if exclude_modules is not None:
        selected = [n for n in selected if not matches_spec(n, exclude_modules)]
    if not selected:
        raise ValueError(
            f"`target_modules={target_modules!r}` (exclude_modules={exclude_modules!r}) matches no linear layer of"
            f" {type(root).__name__}. Linear layers it has end in: {_suffix_examples(linear_names) or 'none'}."
        )
    return selected


def _suffix_examples(names: Sequence[str], limit: int = 8) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    return ", ".join(repr(s) for s in suffixes[:limit])
