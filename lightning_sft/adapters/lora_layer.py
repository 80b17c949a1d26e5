"""The LoRA wrapper around one frozen linear layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sft.anatomy.linear import linear_features, weight_is_transposed
from lightning_sft.adapters.quantization import is_quantized


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``scaling * B @ A``.

    The adapter weights are bare parameters rather than ``nn.Linear`` children so that precision
    plugins which convert every ``nn.Linear`` (bitsandbytes) never quantize them. The base layer
    stays a child named ``base_layer``, the layout HF peft uses.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        in_features, out_features = linear_features(base_layer)
        weight = base_layer.weight
        # Adapters of a 16-bit base train in fp32, as peft does: low-rank updates underflow in bf16.
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters(generator)

    @property
    def dropout_p(self) -> float:
        """The adapter-input dropout probability (0 when the layer was built without dropout)."""
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-uniform A and zero B: the adapter starts as an exact no-op.

        A is drawn on the CPU (from ``generator``, else the global CPU generator) whatever the device,
        so one seed gives the same adapters on every device, before and after the model moved.
        """
        lora_a = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
        self.lora_A.copy_(lora_a)
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        # Scale the r-wide intermediate, not the output: r << out_features.
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A) * self.scaling
        if h.dtype == result.dtype and result.is_contiguous():
            # One fused GEMM accumulates B h into the base output (no extra output-sized temporary).
            out2d = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, self.r), self.lora_B.t())
            return out2d.view(result.shape)
        return result + F.linear(h, self.lora_B).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update in the base weight's own layout and dtype."""
        self._refuse_quantized("fold the adapter into")
        delta = (self.lora_B @ self.lora_A) * self.scaling
        if weight_is_transposed(self.base_layer):
            delta = delta.t()
        return delta.to(self.base_layer.weight.dtype)

    def _refuse_quantized(self, action: str) -> None:
        """A 4-bit base cannot take a dense update: adding it would mean re-quantizing, which changes the base."""
        if is_quantized(self.base_layer):
            raise RuntimeError(
                f"Cannot {action} a 4-bit (QLoRA) base weight. Save the adapter (save_adapter), load it onto the"
                " unquantized base model (load_adapter) and merge there."
            )

    @torch.no_grad()
    def merge(self) -> None:
        self._refuse_quantized("merge the adapter into")
        if self.merged:
            raise RuntimeError("This LoRA layer is already merged; call unmerge() before merging again.")
        self.base_layer.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("This LoRA layer is not merged; there is nothing to unmerge.")
        self.base_layer.weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, rslora={self.use_rslora}, merged={self.merged}"
