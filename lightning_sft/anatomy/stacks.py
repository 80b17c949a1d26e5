"""Finding the stacks of residual blocks layer dropout can skip, and what a skipped block saves.

Pure torch (no Lightning). A stack is an ``nn.ModuleList`` of at least two blocks of one class, each
a module with children and parameters: ``model.layers`` of LLaMA-likes, ``transformer.h`` of GPT-2,
``encoder.layer`` of BERT, a plain ``nn.ModuleList`` of user blocks. Stacks nested inside another
stack's block (MoE experts, per-layer heads) are not blocks of the model's depth and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

# Attention projections whose output width is the attention width d (fused ones hold 3 x d).
_ATTENTION_PROJECTIONS = {"q_proj": 1, "query": 1, "c_attn": 3, "query_key_value": 3, "qkv_proj": 3, "Wqkv": 3}


def _is_stack(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) < 2:
        return False
    kinds = {type(block) for block in module}
    return len(kinds) == 1 and all(
        next(block.children(), None) is not None and next(block.parameters(), None) is not None for block in module
    )


def find_stacks(model: nn.Module, paths: Sequence[str] | None = None) -> list[tuple[str, nn.ModuleList]]:
    """The block stacks of ``model`` in module order (outermost only), or the ones named by ``paths``."""
    if paths is not None:
        stacks = []
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                module = None
            if not isinstance(module, nn.ModuleList):
                found = ", ".join(name for name, _ in find_stacks(model)) or "none"
                raise ValueError(
                    f"`blocks` names {path!r}, which is not an nn.ModuleList of {type(model).__name__} (found stacks:"
                    f" {found}). Give the dotted path of the ModuleList holding the blocks, e.g. 'model.model.layers'."
                )
            stacks.append((path, module))
        return stacks
    stacks = []
    for name, module in model.named_modules():
        if _is_stack(module) and not any(name.startswith(f"{outer}.") for outer, _ in stacks):
            stacks.append((name, module))
    if not stacks:
        raise TypeError(
            f"{type(model).__name__} has no stack of blocks to drop (an nn.ModuleList of >= 2 modules of one class"
            " with parameters). Pass blocks=['path.to.layers'] naming the ModuleList of residual blocks."
        )
    return stacks


def attention_width(block: nn.Module) -> int:
    """The attention width ``heads x head_dim`` of a block (0 if it has no recognisable attention)."""
    for name, module in block.named_modules():
        fused = _ATTENTION_PROJECTIONS.get(name.rsplit(".", 1)[-1])
        weight = getattr(module, "weight", None)
        if fused is None or weight is None or weight.ndim != 2:
            continue
        # nn.Linear stores (out, in); transformers' Conv1D (GPT-2) stores (in, out).
        out = weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0]
        return out // fused
    return 0


def block_step_flops(block: nn.Module, batch: int, seq_len: int) -> float:
    """FLOPs of one training step (forward and backward) of ``block`` on ``batch`` sequences of
    ``seq_len`` tokens, counted as ``torch.utils.flop_counter`` counts them.

    Every 2-D parameter is a matmul weight: ``2 N in out`` forward, the same again for the input
    gradient, and again for the weight gradient only if it trains (frozen LoRA bases skip it).
    Attention adds ``4 T^2 d`` per sequence forward and twice that backward (full T x T, as the
    counter counts SDPA and eager attention alike).
    """
    tokens = batch * seq_len
    matmul = 0.0
    for param in block.parameters():
        if param.ndim == 2:
            matmul += 2.0 * tokens * param.numel() * (3 if param.requires_grad else 2)
    attention = 12.0 * batch * seq_len * seq_len * attention_width(block)
    return matmul + attention
