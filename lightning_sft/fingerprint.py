"""A cheap, deterministic fingerprint of a model's weights, to refuse files made for another base."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from lightning_sft.sharding import full_tensor, is_sharded

_SAMPLES_PER_TENSOR = 4096
_WRAPPED = ".base_layer"
# A layer that keeps its weight in another form (4-bit, ``quantize_base``) holds, in a buffer of this
# name, the sample ``tensor_sample`` took of its original (out_features, in_features) weight.
SOURCE_SAMPLE = "weight_fingerprint_sample"


class TensorSample(NamedTuple):
    """What the fingerprint reads of a tensor that is no longer held as it was: shape, dtype, sample."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    sample: torch.Tensor


def _step(numel: int) -> int:
    return max(1, numel // _SAMPLES_PER_TENSOR)


def tensor_sample(tensor: torch.Tensor) -> torch.Tensor:
    """The fixed strided sample of ``tensor``'s values that its fingerprint digests (a view)."""
    flat = tensor.detach().reshape(-1)
    return flat[:: _step(flat.numel())][:_SAMPLES_PER_TENSOR]


def fingerprint_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor | TensorSample]],
    patches: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> str:
    """SHA-256 over names, shapes, dtypes and a fixed strided sample of every tensor's values.

    Sampling keeps this fast on multi-GB models while any re-training, re-initialisation or shape
    change of a tensor still changes the digest with overwhelming probability. ``patches`` maps a
    name to ``(sorted flat indices, values)``: the digest is that of the tensors with those entries
    replaced, computed without copying them (how a sparse diff knows the fingerprint it produces).
    A ``TensorSample`` stands for a tensor by the sample taken of it.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        shape = tuple(tensor.shape)
        step = _step(math.prod(shape))
        sample = (tensor.sample.detach() if isinstance(tensor, TensorSample) else tensor_sample(tensor)).clone()
        if patches and name in patches:
            _patch_sample(sample, step, *patches[name])
        digest.update(f"{name}|{shape}|{tensor.dtype}|".encode())
        digest.update(sample.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _patch_sample(sample: torch.Tensor, step: int, indices: torch.Tensor, values: torch.Tensor) -> None:
    if indices.numel() == 0:
        return
    indices = indices.to(sample.device)
    positions = torch.arange(sample.numel(), device=sample.device) * step
    slot = torch.searchsorted(indices, positions).clamp_(max=indices.numel() - 1)
    hit = indices[slot] == positions
    sample[hit] = values.to(device=sample.device, dtype=sample.dtype)[slot[hit]]


def base_parameters(root: nn.Module) -> dict[str, nn.Parameter]:
    """The base model's parameters by the names they have without adapters.

    An adapter wrapper (LoRA, sparse deltas) keeps the layer it wraps as ``base_layer``; the
    parameters the wrapper itself owns are the adapter's and are left out, and ``.base_layer`` is
    dropped from the names, so the mapping is the same before and after adapters are injected.
    Tied parameters appear once, under their first name.
    """
    adapter_params = {
        id(param)
        for module in root.modules()
        if isinstance(getattr(module, "base_layer", None), nn.Module)
        for param in module.parameters(recurse=False)
    }
    return {
        name.replace(_WRAPPED + ".", "."): param
        for name, param in root.named_parameters(remove_duplicate=True)
        if id(param) not in adapter_params
    }


def gathered_sample(tensor: torch.Tensor) -> torch.Tensor | TensorSample:
    """``tensor`` itself, or for a sharded one the sample of its whole (gathered one tensor at a time, so
    fingerprinting a sharded model never holds more than one full weight; a collective)."""
    if not is_sharded(tensor):
        return tensor
    return TensorSample(tuple(tensor.shape), tensor.dtype, tensor_sample(full_tensor(tensor)).clone())


def fingerprint_base(root: nn.Module) -> str:
    """Fingerprint of ``root``'s base parameters (see ``base_parameters``); a 4-bit layer counts with the
    sample of the weight it was quantized from, so adapters name the unquantized base."""
    tensors = {name: gathered_sample(param) for name, param in base_parameters(root).items()}
    for name, module in root.named_modules():
        sample = module._buffers.get(SOURCE_SAMPLE)
        if sample is not None:
            key = f"{name}.weight".replace(_WRAPPED + ".", ".").removeprefix(".")
            tensors[key] = TensorSample((module.out_features, module.in_features), sample.dtype, sample)
    return fingerprint_tensors(tensors.items())
