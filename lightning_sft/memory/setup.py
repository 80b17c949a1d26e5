"""How a model is fine-tuned, as the memory model reads it: method, batch, precision and recipes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lightning_sft.recipes.offload import MIN_BYTES
from lightning_sft.validation import check_int

Method = Literal["full", "lora", "qlora", "sft"]
Precision = Literal["32-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed"]
Attention = Literal["eager", "sdpa", "flash_attention_2"]
Optimizer = Literal["adamw", "adamw8bit", "sgd"]
Device = Literal["cuda", "cpu"]

METHODS = ("full", "lora", "qlora", "sft")
PRECISIONS = ("32-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed")
ATTENTIONS = ("eager", "sdpa", "flash_attention_2")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")



@dataclass(frozen=True)
class TrainingSetup:
    """How a model is fine-tuned: method, per-device batch, precision and the memory recipes.

    ``batch`` is the micro-batch on each device. ``layer_dropout`` is the expected fraction of
    blocks skipped (activations shrink by it on average; a step that keeps every block is as large
    as without it). ``device`` matters for details of the kernels (CPU dropout keeps a float mask
    where CUDA keeps a byte mask) and of activation offloading (``offload_activations``, tensors of
    ``offload_min_bytes`` and more): CUDA copies on a side stream into pinned memory, which its
    allocator hands out in powers of two; on CPU the copies are synchronous and exact in size.
    """

    method: Method = "lora"
    batch: int = 1
    seq: int = 2048
    precision: Precision = "bf16-true"
    lora_r: int = 16
    sft_density: float = 0.01
    gradient_checkpointing: bool = False
    attention: Attention = "sdpa"
    optimizer: Optimizer = "adamw"
    zero_stage: int = 0
    gpus: int = 1
    layer_dropout: float = 0.0
    device: Device = "cuda"
    fused_ce: bool = False
    offload_activations: bool = False
    offload_min_bytes: int = MIN_BYTES

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("attention", self.attention, ATTENTIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("device", self.device, ("cuda", "cpu"))
        for name in ("batch", "seq", "lora_r", "gpus"):
            check_int(getattr(self, name), name, 1, "Sizes and counts are positive integers.")
        check_int(self.offload_min_bytes, "offload_min_bytes", 0, f"The offloading default is {MIN_BYTES}.")
        if not 0 < self.sft_density <= 1:
            raise ValueError(f"sft_density must be in (0, 1]; got {self.sft_density!r}, e.g. 0.01 for 1%.")
        if not 0 <= self.layer_dropout < 1:
            raise ValueError(f"layer_dropout must be in [0, 1); got {self.layer_dropout!r}.")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0 (none), 1, 2 or 3 (FSDP FULL_SHARD); got {self.zero_stage!r}.")
        if self.zero_stage and self.gpus == 1:
            raise ValueError("zero_stage shards over several GPUs: set gpus > 1, or zero_stage=0 on one GPU.")
        if self.method == "qlora" and self.precision in ("32-true",):
            raise ValueError("QLoRA computes in 16-bit: use precision='bf16-true' (or '16-true').")

    @property
    def weight_bytes(self) -> int:
        """Bytes per weight element: mixed precision keeps fp32 weights (autocast computes in 16-bit)."""
        return 4 if self.precision in ("32-true", "bf16-mixed", "16-mixed") else 2

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision == "32-true" else 2

    @property
    def adapter_bytes(self) -> int:
        """Adapters and sparse deltas train in fp32; Lightning's "-true" precisions convert them with the model."""
        return 4 if self.precision in ("32-true", "bf16-mixed", "16-mixed") else 2

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def with_(self, **changes: Any) -> TrainingSetup:
        return TrainingSetup(**{**self.__dict__, **changes})


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")
