"""``linear_cross_entropy``: equal to ``F.cross_entropy`` over the materialised logits (loss and every
gradient) for any chunking, ignored labels, label smoothing, both reductions, a sum of head terms, bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_sft.losses import default_chunk, linear_cross_entropy

N, H, V = 37, 16, 50
FP32 = dict(rtol=1e-5, atol=1e-6)  # one chunked fp32 sum against another: measured differences ~6e-8


def _inputs(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::5] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("chunk", [1, 7, None, 1000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equals_cross_entropy_of_the_logits(chunk: int | None, smoothing: float, reduction: str) -> None:
    hidden, weight, bias, labels = _inputs()
    ref = F.cross_entropy(hidden @ weight.T + bias, labels, label_smoothing=smoothing, reduction=reduction)
    got = linear_cross_entropy(hidden, weight, labels, bias, label_smoothing=smoothing, reduction=reduction,
                               chunk_size=chunk)
    torch.testing.assert_close(got, ref, **FP32)
    for want, have in zip(torch.autograd.grad(ref, (hidden, weight, bias)), torch.autograd.grad(got, (hidden, weight, bias))):
        torch.testing.assert_close(have, want, **FP32)


def test_ignored_positions_get_no_gradient_and_all_ignored_is_nan_as_in_torch() -> None:
    hidden, weight, _, labels = _inputs()
    (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, chunk_size=4), (hidden,))
    assert torch.count_nonzero(grad[labels == -100]) == 0 and torch.count_nonzero(grad[labels != -100]) > 0
    none = torch.full((N,), -100)
    assert linear_cross_entropy(hidden, weight, none).isnan() and F.cross_entropy(hidden @ weight.T, none).isnan()


def test_a_sum_of_head_terms_is_the_merged_head_lora_included() -> None:
    hidden, weight, _, labels = _inputs()
    gen = torch.Generator().manual_seed(1)
    lora_a = torch.randn(4, H, generator=gen).requires_grad_()
    lora_b = torch.randn(V, 4, generator=gen).requires_grad_()
    merged = F.cross_entropy(hidden @ weight.T + 0.5 * (hidden @ lora_a.T) @ lora_b.T, labels)
    fused = linear_cross_entropy([hidden, 0.5 * hidden @ lora_a.T], [weight, lora_b], labels, chunk_size=5)
    torch.testing.assert_close(fused, merged, **FP32)
    params = (hidden, weight, lora_a, lora_b)
    for want, have in zip(torch.autograd.grad(merged, params), torch.autograd.grad(fused, params)):
        torch.testing.assert_close(have, want, **FP32)


def test_bf16_matches_the_upcast_logits_a_hugging_face_loss_reads() -> None:
    hidden, weight, _, labels = _inputs(torch.bfloat16)
    ref = F.cross_entropy((hidden @ weight.T).float(), labels)  # logits in the weights' dtype, loss in fp32
    got = linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # bf16 gradients: both sides round the fp32 softmax gradient to bf16 once before the product.
    for want, have in zip(torch.autograd.grad(ref, (hidden, weight)), torch.autograd.grad(got, (hidden, weight))):
        assert have.dtype == torch.bfloat16
        torch.testing.assert_close(have.float(), want.float(), rtol=2e-2, atol=2e-3)


def test_frozen_weights_get_no_gradient_buffer_and_no_grad_calls_only_score() -> None:
    hidden, weight, _, labels = _inputs()
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels)
    assert torch.autograd.grad(loss, hidden)[0].shape == hidden.shape
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), F.cross_entropy(hidden @ weight.T, labels))


def test_the_default_chunk_keeps_a_chunks_logits_about_the_hidden_states_size() -> None:
    assert default_chunk(4 * 2048, 128256, 4096) == 256  # 8192 tokens in 32 chunks (vocab / hidden = 31.3)
    assert default_chunk(1024, 32000, 128) == 64  # 5 by size: raised to MIN_CHUNK, where the GEMM is efficient
    assert default_chunk(10, 8, 16) == 10 and default_chunk(0, 8, 16) == 1


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda h, w, b, y: (h, [w, w], y, b, {}), "2 weights"),
        (lambda h, w, b, y: (h, w[:, :3], y, b, {}), "term 0 has hidden"),
        (lambda h, w, b, y: (h, w, y[:5], b, {}), "leading dims"),
        (lambda h, w, b, y: (h, w, y.int(), b, {}), "labels must be int64"),
        (lambda h, w, b, y: (h, w, y, b[:3], {}), "bias"),
        (lambda h, w, b, y: (h, w, y.clamp(min=0) + V, b, {}), r"labels must lie in \[0, 50\)"),
        (lambda h, w, b, y: (h, w, y, b, {"label_smoothing": 1.0}), "label_smoothing"),
        (lambda h, w, b, y: (h, w, y, b, {"reduction": "none"}), "reduction"),
        (lambda h, w, b, y: (h, w, y, b, {"chunk_size": 0}), "chunk_size"),
    ],
    ids=["terms", "width", "labels-shape", "labels-dtype", "bias", "labels-range", "smoothing", "reduction", "chunk"],
)
def test_bad_input_is_refused_with_the_fix(change, match: str) -> None:
    hidden, weight, labels_bias, labels = _inputs()
    h, w, y, b, options = change(hidden, weight, labels_bias, labels)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(h, w, y, b, **options)
