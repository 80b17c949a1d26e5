"""A cheap, deterministic fingerprint of a model's weights, to refuse files made for another base."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

_SAMPLES_PER_TENSOR = 4096


def fingerprint_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, shapes, dtypes and a fixed strided sample of every tensor's values.

    Sampling keeps this fast on multi-GB models while any re-training, re-initialisation or shape
    change of a tensor still changes the digest with overwhelming probability.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
