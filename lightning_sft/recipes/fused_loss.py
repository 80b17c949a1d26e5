"""Fused linear cross-entropy inside a Hugging Face causal LM: its own loss, without its logits.

A causal LM given ``labels`` computes ``logits = lm_head(hidden)`` for every token and then the loss. In
training, ``FusedLoss`` has it run its body (``model.<base_model_prefix>``) and compute the same loss with
``losses.linear_cross_entropy`` from the final hidden states and the head, chunk by chunk, returning
``logits=None``; evaluation, predict and calls without labels run the model's own forward (real logits).
The head may be an ``nn.Linear`` (bias included, tied to the input embeddings or not) or a LoRA wrapper of
one (its branch is a second linear term, so LoRA on the head trains exactly). Models that change logits
after the head (soft-capping, logit scales) or add to the loss (MoE router losses) are refused with the
reason. ``backend`` picks the loss's kernel (``losses.liger``): Liger-Kernel's on CUDA for a plain head when it
is installed, the torch chunked loss otherwise. Pure torch (no Lightning).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sft.adapters.lora_layer import LoRALinear
from lightning_sft.adapters.quantization import is_quantized
from lightning_sft.anatomy.modules import instance_forward, restore_forward
from lightning_sft.losses import linear_cross_entropy
from lightning_sft.losses.liger import Backend, resolve_backend, unsupported

IGNORE_INDEX = -100  # what Hugging Face's causal-LM loss ignores
# Config entries whose model changes the logits after the head, or adds to the loss, when set.
_LOGIT_CHANGES = {
    "final_logit_softcapping": "soft-caps the logits after the head",
    "logit_scale": "scales the logits after the head",
    "logits_scaling": "scales the logits after the head",
    "output_router_logits": "adds its router's auxiliary loss to the loss",
}
_NEUTRAL = (None, False, 1, 1.0)


def causal_lms(module: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face models in ``module`` that compute a causal-LM loss from a head."""
    from transformers import PreTrainedModel

    found: list[nn.Module] = []
    for sub in module.modules():
        if any(sub is inner for outer in found for inner in outer.modules()):
            continue
        if isinstance(sub, PreTrainedModel) and sub.get_output_embeddings() is not None:
            found.append(sub)
    return found


def refusal(model: nn.Module) -> str | None:
    """Why the fused loss cannot stand in for ``model``'s own (None: it can)."""
    name = type(model).__name__
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(body, nn.Module) or body is model:
        return f"{name} has no separate body (`base_model_prefix`) to take the final hidden states from"
    config = getattr(model, "config", None)
    for key, what in _LOGIT_CHANGES.items():
        if getattr(config, key, None) not in _NEUTRAL:
            return f"{name} {what} ({key}={getattr(config, key)!r}), which the fused loss does not reproduce"
    head = model.get_output_embeddings()
    base = head.base_layer if isinstance(head, LoRALinear) else head
    if not isinstance(base, nn.Linear) or is_quantized(base):
        return f"{name}'s head is a {type(base).__name__}; the fused loss reads an nn.Linear (or LoRA over one)"
    return None


def head_term_count(head: nn.Module) -> int:
    """How many linear terms ``head_terms`` gives ``head``: two for a LoRA head not merged, else one."""
    return 2 if isinstance(head, LoRALinear) and not head.merged else 1


def head_terms(head: nn.Module, hidden: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
    """``logits = sum_k hidden_k @ weight_k.T + bias`` of ``head`` (``nn.Linear`` or a LoRA wrapper of one)."""
    base = head.base_layer if isinstance(head, LoRALinear) else head
    if head_term_count(head) == 1:
        return [hidden], [base.weight], base.bias
    branch = F.linear(head.dropout(hidden).to(head.lora_A.dtype), head.lora_A) * head.scaling
    return [hidden, branch], [base.weight, head.lora_B], base.bias


class FusedLoss:
    """The fused training loss installed over each causal LM's ``forward`` (``install``/``remove``)."""

    def __init__(self, models: list[nn.Module], chunk_size: int | None = None, backend: Backend = "auto") -> None:
        self.models, self.chunk_size, self.backend = models, chunk_size, backend
        self._previous: list[Any] = []  # each model's instance forward before ``install``

    def check(self, device: torch.device) -> None:
        """Raise now what the loss's backend rule would raise at the first step on ``device`` for the heads as
        they are (what depends on the step's tensors, such as a frozen body, is checked by the call)."""
        for model in self.models:
            head = model.get_output_embeddings()
            base = head.base_layer if isinstance(head, LoRALinear) else head
            resolve_backend(self.backend, device, head_term_count(head),
                            unsupported(base.weight.dtype, self.chunk_size, head_grads_only=False))

    def install(self) -> None:
        self._previous = [instance_forward(model) for model in self.models]
        for model in self.models:
            model.forward = partial(self._forward, model, model.forward)

    def remove(self) -> None:
        for model, previous in zip(self.models, self._previous):
            restore_forward(model, previous)
        self._previous = []

    def _forward(self, model: nn.Module, original: Any, *args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if not model.training or labels is None or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs = {key: value for key, value in kwargs.items() if key not in ("labels", "logits_to_keep", "return_dict")}
        items = kwargs.pop("num_items_in_batch", None)
        out = getattr(model, model.base_model_prefix)(*args, **kwargs)
        hidden = out[0]
        # Position t predicts token t + 1, as the model's own loss shifts; the last position predicts nothing.
        targets = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).to(hidden.device)
        hiddens, weights, bias = head_terms(model.get_output_embeddings(), hidden)
        loss = linear_cross_entropy(hiddens, weights, targets, bias, ignore_index=IGNORE_INDEX,
                                    reduction="mean" if items is None else "sum", chunk_size=self.chunk_size,
                                    backend=self.backend)
        if items is not None:
            loss = loss / items
        # No cache in the output: a training step has no use for it (and reading it warns on new transformers).
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))
