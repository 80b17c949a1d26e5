"""4-bit weights in the kernels: ``nf4.decode`` of whole weights, rows and columns against bitsandbytes'
own decoder, ``sparse_matmul`` over a ``Packed4bit`` against the dense dequantized product (forward and
input gradients, decoding only the kept slice), the dense view estimators read, and refusals."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sft.adapters import quantization
from lightning_sft.adapters.quantization import (
    dense_view,
    dequantize_cols,
    dequantize_rows,
    dequantize_weight,
    packed_weight,
    quantize_base,
)
from lightning_sft.kernels import Packed4bit, nf4, sparse_matmul

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread", "eager")


@pytest.fixture
def eager() -> Iterator[None]:
    """bitsandbytes decodes odd widths with a torch.compile'd function: compiling each shape costs seconds."""
    with torch.compiler.set_stance("force_eager"):
        yield


def _linear4bit(out_features: int, in_features: int, quant_type: str, double_quant: bool, dtype: torch.dtype,
                blocksize: int, compute_dtype: torch.dtype | None = None) -> nn.Module:
    torch.manual_seed(out_features * 1000 + in_features)
    linear = nn.Linear(in_features, out_features).to(dtype).requires_grad_(False)
    if blocksize == 64 and in_features % 16:
        holder = nn.Sequential(linear)
        quantize_base(holder, quant_type, compute_dtype, double_quant=double_quant)
        return holder[0]
    layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=compute_dtype or dtype, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type, module=layer)
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")


# --- decoding --------------------------------------------------------------------------------------

SHAPES = [(7, 37), (5, 130), (3, 1), (6, 200), (4, 256), (3, 201), (2, 512)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_and_cols_decode_bit_exactly_what_bitsandbytes_decodes(quant_type, double_quant, dtype) -> None:
    for out_features, in_features in SHAPES:
        for blocksize in (64, 256):
            if in_features % 16 == 0 and in_features % blocksize:
                continue  # bitsandbytes' own CPU decoder is wrong there (see the refusal test)
            layer = _linear4bit(out_features, in_features, quant_type, double_quant, dtype, blocksize)
            full = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            assert full.shape == (out_features, in_features) and full.dtype == dtype
            assert torch.equal(dequantize_weight(layer), full)
            packed = packed_weight(layer)
            assert packed.shape == (out_features, in_features) and packed.nested == double_quant
            assert torch.equal(nf4.decode(packed), full)
            rows = torch.tensor(sorted({0, out_features // 2, out_features - 1}))
            cols = torch.tensor(sorted({0, 1 % in_features, in_features // 3, in_features - 1}))
            assert torch.equal(dequantize_rows(layer, rows), full[rows]), (out_features, in_features, blocksize)
            assert torch.equal(dequantize_cols(layer, cols), full[:, cols]), (out_features, in_features, blocksize)
            assert torch.equal(nf4.decode(packed, rows, cols), full[rows][:, cols])
            every_row, every_col = torch.arange(out_features), torch.arange(in_features)
            assert torch.equal(dequantize_rows(layer, every_row), full)
            assert torch.equal(dequantize_cols(layer, every_col), full)


def test_decoders_refuse_bad_indices_and_layers() -> None:
    layer = _linear4bit(4, 64, "nf4", True, torch.float32, 64)
    with pytest.raises(ValueError, match="int64"):
        dequantize_rows(layer, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        dequantize_cols(layer, torch.tensor([64]))
    with pytest.raises(ValueError, match="rows on meta, but the weight is on cpu"):
        nf4.decode(packed_weight(layer), rows=torch.tensor([0], device="meta"), check=True)
    with pytest.raises(TypeError, match="not a 4-bit quantized layer"):
        dequantize_weight(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="not a 4-bit quantized layer"):
        packed_weight(nn.Linear(4, 4))


def test_dense_view_decodes_on_use_without_holding_the_weight() -> None:
    layer = _linear4bit(6, 64, "nf4", True, torch.float32, 64)
    view = dense_view(layer)
    assert view.shape == (6, 64) and view.dtype == torch.float32 and isinstance(view, torch.Tensor)
    assert type(view) is quantization.DequantizedWeight and view._layer is layer  # no dense copy held
    assert torch.equal(view.detach().float().T.contiguous(), dequantize_weight(layer).T)
    linear = nn.Linear(3, 2)
    assert dense_view(linear) is linear.weight


# --- the sliced product ----------------------------------------------------------------------------

DTYPES = {  # weight, compute, activation
    "fp32": (torch.float32, None, torch.float32),
    "bf16": (torch.bfloat16, None, torch.bfloat16),
    "fp32-weight-bf16-compute": (torch.float32, torch.bfloat16, torch.float32),
}


@pytest.mark.parametrize("kind", ["rows", "cols"])
@pytest.mark.parametrize("tokens", [3, 64], ids=["slice-decoded-again", "slice-kept"])
@pytest.mark.parametrize("dtypes", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize(("shape", "double_quant"), [((48, 64), True), ((40, 37), False), ((16, 128), True)])
def test_sliced_4bit_product_matches_the_dense_dequantized_product_and_its_input_gradients(
    monkeypatch, kind: str, tokens: int, dtypes: str, shape: tuple[int, int], double_quant: bool
) -> None:
    weight_dtype, compute_dtype, dtype = DTYPES[dtypes]
    layer = _linear4bit(*shape, "nf4", double_quant, weight_dtype, 64, compute_dtype)
    packed, full = packed_weight(layer), dequantize_weight(layer)
    compute = compute_dtype or dtype
    out_features, in_features = shape
    limit = out_features if kind == "rows" else in_features
    for idx in (torch.arange(1, limit, 3), torch.arange(0)):
        decoded: list[tuple[int, bool]] = []

        def counting_decode(packed, rows=None, cols=None, **kwargs):
            assert (rows, cols)[kind == "cols"].equal(idx) and (rows, cols)[kind == "rows"] is None
            out = original(packed, rows, cols, **kwargs)
            decoded.append(out.numel())
            return out

        original = nf4.decode
        monkeypatch.setattr(nf4, "decode", counting_decode)
        bias = layer.bias.detach().clone().requires_grad_(True)
        width = in_features if kind == "rows" else idx.numel()
        a = torch.randn(2, tokens, width, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_(True)
        out = sparse_matmul(kind, a, packed, idx, bias)
        monkeypatch.undo()
        assert out.dtype == dtype and out.shape == (2, tokens, idx.numel() if kind == "rows" else out_features)
        w = full[idx] if kind == "rows" else full[:, idx]
        sliced = F.linear(a.to(compute), w.to(compute), (bias[idx] if kind == "rows" else bias).to(compute))
        assert torch.equal(out, sliced.to(dtype))

        # The dense product over the dequantized weight: all output rows, or an input zero off ``idx``.
        a_ref = a.detach().clone().requires_grad_(True)
        bias_ref = bias.detach().clone().requires_grad_(True)
        a_full = a_ref if kind == "rows" else a_ref.new_zeros(2, tokens, in_features).index_copy(2, idx, a_ref)
        dense = F.linear(a_full.to(compute), full.to(compute), bias_ref.to(compute)).to(dtype)
        dense = dense.index_select(2, idx) if kind == "rows" else dense
        tolerance = dict(rtol=1e-5, atol=1e-5) if compute == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out, dense, **tolerance)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
        monkeypatch.setattr(nf4, "decode", counting_decode)
        out.backward(grad)
        monkeypatch.undo()
        dense.backward(grad)
        torch.testing.assert_close(a.grad, a_ref.grad, **tolerance)
        torch.testing.assert_close(bias.grad, bias_ref.grad, **tolerance)
        if kind == "rows":  # dropped output channels get no bias gradient, as in the dense model
            dropped = torch.ones(out_features, dtype=torch.bool).index_fill(0, idx, False)
            assert not bias.grad[dropped].any()
        assert layer.weight.grad is None and not packed.data.requires_grad
        # Only the slice is decoded: in forward, and in backward again unless the forward kept it.
        kept = w.numel() <= 2 * tokens * max(w.shape)
        assert decoded == [w.numel()] * (1 if kept else 2)


# --- refusals --------------------------------------------------------------------------------------

def test_a_malformed_packed4bit_is_refused_on_construction() -> None:
    packed = packed_weight(_linear4bit(4, 64, "nf4", True, torch.float32, 64))
    plain = packed_weight(_linear4bit(4, 64, "nf4", False, torch.float32, 64))
    bad = [
        (packed, dict(data=packed.data[:-1]), r"data of a \(4, 64\) weight must have shape \(128,\); got \(127,\)"),
        (packed, dict(data=packed.data.float()), "data must be torch.uint8"),
        (packed, dict(shape=(4, -64)), "non-negative ints"),
        (packed, dict(blocksize=0), "blocksize must be a positive int"),
        (packed, dict(dtype=torch.int8), "dtype must be a floating-point torch.dtype"),
        (packed, dict(code=packed.code[:8]), r"code of a \(4, 64\) weight must have shape \(16,\)"),
        (packed, dict(absmax=packed.absmax.float()), "absmax must be torch.uint8"),
        (packed, dict(nested_absmax=packed.nested_absmax.repeat(2)), "nested_absmax of a"),
        (packed, dict(offset=None), "offset must be a tensor"),
        (plain, dict(absmax=plain.absmax[:2]), r"absmax of a \(4, 64\) weight must have shape \(4,\)"),
        (plain, dict(absmax=plain.absmax.to("meta")), "absmax is on meta but data is on cpu"),
    ]
    for base, change, message in bad:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(base, **change)
    assert isinstance(dataclasses.replace(packed), Packed4bit)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(transposed=True), r"stored \(out, in\): pass transposed=False"),
        (dict(backend="triton"), "torch backend only"),
        (dict(idx=torch.tensor([0, 3], dtype=torch.int32)), "int64"),
        (dict(idx=torch.tensor([0, 4])), "outside"),
        (dict(idx=torch.tensor([3, 0])), "sorted and unique"),
        (dict(idx=torch.tensor([0, 1], device="meta")), "device|meta"),
        (dict(a=torch.randn(3, 63)), "in_features = 64"),
        (dict(bias=torch.zeros(2)), "full layer bias"),
        (dict(a=torch.ones(3, 64, dtype=torch.int64)), "floating-point"),
    ],
    ids=["transposed", "triton", "int32", "range", "unsorted", "device", "width", "bias", "int-activation"],
)
def test_sparse_matmul_refuses_bad_arguments_with_a_4bit_weight(monkeypatch, kwargs: dict, message: str) -> None:
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded before the arguments were checked")

    packed = packed_weight(_linear4bit(4, 64, "nf4", True, torch.float32, 64))
    monkeypatch.setattr(nf4, "decode", no_decode)
    args = {"kind": "rows", "a": torch.randn(3, 64), "weight": packed, "idx": torch.tensor([0, 2]), "bias": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        sparse_matmul(**args)
