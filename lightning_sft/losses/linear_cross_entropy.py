"""Cross-entropy of a linear head without the ``(tokens, vocab)`` logits: computed chunk by chunk of tokens.

A causal LM's loss reads ``hidden @ W.T`` for every token over the whole vocabulary; unfused, the fp32
logits and their gradient are two ``tokens x vocab`` tensors, at a 128k vocabulary the largest term of a
fine-tuning step (docs/memory.md). Here each chunk of tokens computes its logits, its loss and, when
gradients are needed, the gradient of the hidden states, head weights and bias in the forward pass (the
logits are never kept); backward scales those by the incoming gradient. The head may be a sum of linear
terms, ``logits = sum_k hidden_k @ W_k.T + b``, so a LoRA head (base weight plus ``B`` on ``s * A x``) is
exact without building its merged weight. On CUDA, a one-term head runs Liger-Kernel's fused Triton kernel
instead when it is installed (``losses.liger``, ``backend=``); elsewhere, and for LoRA heads, this pure torch
path runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_sft.losses.liger import BACKENDS, Backend, liger_cross_entropy, resolve_backend, unsupported

REDUCTIONS = ("mean", "sum")


# Fewer rows than this make a GEMM over the vocabulary overhead-bound: `lightning-sft bench fused-ce` at hidden
# 128 and vocab 32k stepped 1.56x slower than the unfused loss with 5-token chunks and 0.65x with 64.
MIN_CHUNK = 64


def default_chunk(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk: such that a chunk's logits hold about as many entries as the hidden states do, and
    at least ``MIN_CHUNK`` (or all the tokens, if fewer)."""
    by_size = math.ceil(tokens / max(1, math.ceil(vocab / hidden)))
    return max(1, min(tokens, max(by_size, MIN_CHUNK)))


def linear_cross_entropy(
    hidden: Tensor | Sequence[Tensor],
    weight: Tensor | Sequence[Tensor],
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, labels)`` over ``(..., vocab)`` logits it never holds.

    Args:
        hidden: ``(..., H)`` final hidden states, or a sequence of ``(..., H_k)`` terms.
        weight: ``(V, H)`` head weight, or one ``(V, H_k)`` weight per hidden term (logits are their sum).
        labels: ``(...)`` int64 targets in ``[0, V)`` or ``ignore_index``; no shifting is done here.
        bias: optional ``(V,)``.
        ignore_index, label_smoothing, reduction: as ``F.cross_entropy`` (``mean`` over the labels not
            ignored, or ``sum``).
        chunk_size: tokens per chunk of the torch path; None: ``default_chunk`` (Liger sizes its own chunks by
            about the same rule; a chunk_size set keeps the call on torch).
        backend: "auto": Liger-Kernel's fused kernel for CUDA tensors of a one-term head when liger-kernel is
            installed (``pip install 'lightning-sft[liger]'``) and the call is one it computes as this path does
            (``liger.unsupported``), this torch path otherwise; a LoRA head (two terms) always stays here, since
            Liger's kernel takes one weight. "torch", or "liger" (raises with the fix where it cannot run; on
            CPU only under ``TRITON_INTERPRET=1``).

    Returns:
        The scalar loss (fp32). Logits are computed in the weights' dtype and reduced in fp32, as a Hugging
        Face model's loss does. Gradients reach every hidden term, weight and bias that requires them.
    """
    hiddens = [hidden] if isinstance(hidden, Tensor) else list(hidden)
    weights = [weight] if isinstance(weight, Tensor) else list(weight)
    _check(hiddens, weights, labels, bias, label_smoothing, reduction, chunk_size, backend)
    flat = [h.reshape(-1, h.shape[-1]) for h in hiddens]
    targets = labels.reshape(-1)
    vocab = weights[0].shape[0]
    if bool(((targets < 0) | (targets >= vocab))[targets != ignore_index].any()):
        raise ValueError(f"linear_cross_entropy: labels must lie in [0, {vocab}) or be ignore_index={ignore_index}.")
    head_grads_only = torch.is_grad_enabled() and not flat[0].requires_grad and (
        weights[0].requires_grad or (bias is not None and bias.requires_grad))
    why_not = unsupported(weights[0].dtype, chunk_size, head_grads_only)
    if resolve_backend(backend, flat[0].device, len(flat), why_not) == "liger":
        return liger_cross_entropy(flat[0], weights[0], targets, bias, ignore_index, float(label_smoothing), reduction)
    chunk = chunk_size or default_chunk(targets.numel(), vocab, sum(h.shape[-1] for h in flat))
    return _LinearCrossEntropy.apply(targets, ignore_index, float(label_smoothing), reduction, chunk, len(flat), bias,
                                     *flat, *weights)


def _check(hiddens: list[Tensor], weights: list[Tensor], labels: Tensor, bias: Tensor | None, smoothing: float,
           reduction: str, chunk_size: int | None, backend: str) -> None:
    if not hiddens or len(hiddens) != len(weights):
        raise ValueError(f"linear_cross_entropy: {len(hiddens)} hidden terms for {len(weights)} weights; pass one"
                         " weight per hidden term.")
    vocab = weights[0].shape[0] if weights[0].dim() == 2 else -1
    for k, (h, w) in enumerate(zip(hiddens, weights)):
        if w.dim() != 2 or w.shape[0] != vocab or h.shape[-1] != w.shape[1]:
            raise ValueError(f"linear_cross_entropy: term {k} has hidden {tuple(h.shape)} and weight {tuple(w.shape)};"
                             " each weight is (vocab, H_k) with one vocab, and its hidden term ends in H_k.")
        if h.shape[:-1] != labels.shape:
            raise ValueError(f"linear_cross_entropy: hidden {tuple(h.shape)} and labels {tuple(labels.shape)} differ in"
                             " their leading dims; shift the labels (labels[..., 1:]) before the call if needed.")
    if labels.dtype != torch.int64:
        raise ValueError(f"linear_cross_entropy: labels must be int64, got {labels.dtype}; use labels.long().")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"linear_cross_entropy: bias {tuple(bias.shape)} must be ({vocab},).")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1), got {smoothing!r}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size must be a positive int or None, got {chunk_size!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"linear_cross_entropy: backend must be one of {BACKENDS}, got {backend!r}; 'auto' takes"
                         " Liger-Kernel's kernel where it can run and the torch path elsewhere.")


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and, when needed, all gradients in one pass over token chunks; backward scales them."""

    @staticmethod
    def forward(ctx, labels: Tensor, ignore_index: int, smoothing: float, reduction: str, chunk: int, terms: int,
                bias: Tensor | None, *operands: Tensor) -> Tensor:
        hiddens, weights = operands[:terms], operands[terms:]
        vocab, tokens = weights[0].shape[0], labels.numel()
        kept = labels != ignore_index  # values checked by linear_cross_entropy
        count = kept.sum()
        scale = count.clamp(min=1).float() if reduction == "mean" else torch.ones((), device=labels.device)
        need_h = [ctx.needs_input_grad[7 + k] for k in range(terms)]
        need_w = [ctx.needs_input_grad[7 + terms + k] for k in range(terms)]
        need_b = bias is not None and ctx.needs_input_grad[6]
        grads = any(need_h) or any(need_w) or need_b  # forward runs without grad mode; these say what is wanted
        grad_h = [torch.empty_like(h) if need else None for h, need in zip(hiddens, need_h)]
        grad_w = [torch.zeros_like(w, dtype=torch.float32) if need else None for w, need in zip(weights, need_w)]
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=labels.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=labels.device)
        for start in range(0, tokens, chunk):
            rows = slice(start, start + chunk)
            xs = [h[rows].to(w.dtype) for h, w in zip(hiddens, weights)]
            z = xs[0] @ weights[0].T  # summed in place: Python's sum(...) would allocate a second chunk of logits
            for x, w in zip(xs[1:], weights[1:]):
                z += x @ w.T
            if bias is not None:
                z += bias.to(z.dtype)
            z = z.float()
            target, ok = labels[rows].clamp(min=0), kept[rows]
            lse = torch.logsumexp(z, dim=-1)
            loss = lse - z.gather(1, target[:, None])[:, 0]
            if smoothing:
                loss = (1 - smoothing) * loss + smoothing * (lse - z.mean(dim=-1))
            total += (loss * ok).sum()
            if not grads:
                continue
            g = z.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            g.scatter_add_(1, target[:, None], torch.full_like(target[:, None], smoothing - 1, dtype=g.dtype))
            if smoothing:
                g -= smoothing / vocab
            g *= (ok / scale)[:, None]
            for k, (x, w) in enumerate(zip(xs, weights)):
                gk = g.to(w.dtype)
                if grad_h[k] is not None:
                    grad_h[k][rows] = (gk @ w).to(grad_h[k].dtype)
                if grad_w[k] is None:
                    continue
                if w.dtype == torch.float32:
                    grad_w[k].addmm_(gk.T, x)  # accumulated in place: no (vocab, H) temporary per chunk
                else:
                    grad_w[k] += (gk.T @ x).float()
            if grad_b is not None:
                grad_b += g.sum(dim=0)
        ctx.grads = (grad_b, grad_h, grad_w)
        ctx.dtypes = (None if bias is None else bias.dtype, [w.dtype for w in weights])
        return total / count.float() if reduction == "mean" else total  # all ignored: nan, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_b, grad_h, grad_w = ctx.grads
        bias_dtype, weight_dtypes = ctx.dtypes
        scaled_h = [None if g is None else g * grad_out.to(g.dtype) for g in grad_h]
        scaled_w = [None if g is None else (g * grad_out).to(dtype) for g, dtype in zip(grad_w, weight_dtypes)]
        scaled_b = None if grad_b is None else (grad_b * grad_out).to(bias_dtype)
        ctx.grads = None
        return (None, None, None, None, None, None, scaled_b, *scaled_h, *scaled_w)
