"""Adapter structure inside Lightning checkpoints, and loading such checkpoints outside a Trainer."""

from __future__ import annotations

import io
import os
import warnings
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_sft.adapters.injection import adapter_structure, inject_structure, lora_layers
from lightning_sft.adapters.quantization import quantization_record, quantize_from_record

CHECKPOINT_KEY = "lightning_sft_lora"
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def structure_record(module: nn.Module) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the adapters before its state dict is loaded."""
    layers = lora_layers(module).values()
    return {
        "structure": adapter_structure(module),
        "dropout": max((layer.dropout_p for layer in layers), default=0.0),
        "use_rslora": any(l.use_rslora for l in layers),
        "quantization": quantization_record(module),  # 4-bit base layers (QLoRA), rebuilt before loading
    }


def load_from_checkpoint(
    module_class: type[ModuleT], checkpoint_path: str | os.PathLike, map_location: Any = None, **kwargs: Any
) -> ModuleT:
    """``module_class.load_from_checkpoint`` for checkpoints written with the ``LoRA`` callback.

    Lightning's own classmethod cannot know about adapters (callbacks take no part in it), so this
    builds the module from the checkpoint's hyperparameters, rebuilds the recorded adapters, and
    then loads the full state dict strictly.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    record = checkpoint.get(CHECKPOINT_KEY)
    if record is None:
        raise ValueError(
            f"{checkpoint_path} records no LoRA adapters; load it with `{module_class.__name__}.load_from_checkpoint`."
        )
    # Build the bare module from hyperparameters only: its state dict is loaded once adapters exist.
    buffer = io.BytesIO()
    torch.save({**checkpoint, "state_dict": {}}, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*keys that are in the model state dict but not in the checkpoint.*")
        warnings.filterwarnings("ignore", message=".*contains no parameters.*")
        module = module_class.load_from_checkpoint(buffer, map_location="cpu", strict=False, **kwargs)
    inject_structure(module, record["structure"], record["dropout"], record["use_rslora"])
    if record.get("quantization"):
        quantize_from_record(module, record["quantization"])
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    if isinstance(map_location, (str, torch.device)):
        module = module.to(map_location)
    return module
