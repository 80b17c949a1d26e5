"""Gather-GEMM kernels: the torch path against dense masked autograd, the Triton kernels against the
torch path under the interpreter (in a subprocess), and the dispatcher's rules and refusals; the
token-row split/merge against boolean indexing, and inside the sparse layers on both of its paths.

Run as a script (with TRITON_INTERPRET=1) this file performs the interpreter checks itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from torch import Tensor

import lightning_sft.kernels.reference as reference
import lightning_sft.kernels.token_rows as token_rows
from lightning_sft.kernels import available_backends, cols_matmul, resolve_backend, rows_matmul, sparse_matmul
from lightning_sft.kernels.dispatch import fused_rows_matmul
from lightning_sft.kernels.token_rows import TokenRows

TOKENS, IN, OUT, K = 37, 50, 70, 23  # ragged on purpose: no dimension is a multiple of 16
CPU = torch.device("cpu")


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}


def _case(
    kind: str,
    k: int | None,
    dtype: torch.dtype,
    transposed: bool,
    seed: int = 0,
    tokens: int = TOKENS,
    n_in: int = IN,
    n_out: int = OUT,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logical weight (out, in), stored weight, idx, activation, bias); k=None keeps every channel."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n_out, n_in, generator=g) * 0.2).to(dtype)
    limit = n_out if kind == "rows" else n_in
    k = limit if k is None else k
    idx = torch.randperm(limit, generator=g)[:k].sort().values
    a = torch.randn(tokens, n_in if kind == "rows" else k, generator=g).to(dtype)
    bias = torch.randn(n_out, generator=g).to(dtype)
    return w, (w.t().contiguous() if transposed else w), idx, a, bias


def _dense_masked(kind: str, a: Tensor, w: Tensor, idx: Tensor, bias: Tensor | None) -> Tensor:
    """The same function computed densely in autograd, with the dropped channels zeroed."""
    if kind == "rows":
        mask = torch.zeros(w.shape[0], dtype=w.dtype).index_fill_(0, idx, 1.0)
        full = a @ (w * mask[:, None]).T + (0 if bias is None else bias * mask)
        return full[:, idx]
    h_full = torch.zeros(a.shape[0], w.shape[1], dtype=a.dtype).index_copy(1, idx, a)
    return h_full @ w.T + (0 if bias is None else bias)


def _run(kind: str, a: Tensor, stored: Tensor, idx: Tensor, bias: Tensor | None, **kw: object) -> tuple:
    """Output, activation gradient and bias gradient for a random upstream gradient."""
    a = a.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y = sparse_matmul(kind, a, stored, idx, bias, **kw)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
    (y * upstream).sum().backward()
    return y.detach(), a.grad, None if bias is None else bias.grad


# --- torch reference vs dense masked autograd -------------------------------------------------


@pytest.mark.parametrize("kind", ["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["W", "Wt"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("k", [0, K, None], ids=["k0", "k23", "kfull"])
def test_torch_path_matches_dense_masked_autograd(kind, dtype, transposed, with_bias, k) -> None:
    w, stored, idx, a, bias = _case(kind, k, dtype, transposed)
    bias = bias if with_bias else None
    y, grad_a, grad_bias = _run(kind, a, stored, idx, bias, transposed=transposed, backend="torch")

    # The oracle is fp32 math on the same (possibly fp16-rounded) values.
    a32 = a.float().requires_grad_()
    b32 = None if bias is None else bias.float().requires_grad_()
    y_ref = _dense_masked(kind, a32, w.float(), idx, b32)
    upstream = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3)).to(dtype).float()
    (y_ref * upstream).sum().backward()

    expected_width = idx.numel() if kind == "rows" else OUT
    assert y.shape == (TOKENS, expected_width) and y.dtype == dtype
    assert grad_a.shape == a.shape and grad_a.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref.detach(), **_tol(dtype))
    torch.testing.assert_close(grad_a.float(), a32.grad, **_tol(dtype))
    if bias is not None:
        torch.testing.assert_close(grad_bias.float(), b32.grad, **_tol(dtype))


def test_k0_edge_cases_are_defined() -> None:
    _, w, idx, x, bias = _case("rows", 0, torch.float32, False)
    assert rows_matmul(x, w, idx, bias).shape == (TOKENS, 0)
    _, w, idx, h, bias = _case("cols", 0, torch.float32, False)
    assert torch.equal(cols_matmul(h, w, idx, bias), bias.expand(TOKENS, OUT))
    assert torch.equal(cols_matmul(h, w, idx), torch.zeros(TOKENS, OUT))


def test_leading_dimensions_are_kept() -> None:
    _, w, idx, _, bias = _case("rows", K, torch.float32, False)
    x = torch.randn(2, 5, IN)
    y = rows_matmul(x, w, idx, bias)
    assert y.shape == (2, 5, K)
    torch.testing.assert_close(y, x @ w[idx].T + bias[idx])
    h = torch.randn(2, 5, K)
    _, w, idx, _, bias = _case("cols", K, torch.float32, False)
    torch.testing.assert_close(cols_matmul(h, w, idx, bias), h @ w[:, idx].T + bias)


def test_transposed_weight_is_read_without_a_copy(monkeypatch) -> None:
    """The Conv1D layout reaches the backend as a strided view of the same storage."""
    _, stored, idx, x, _ = _case("rows", K, torch.float32, True)
    seen = []
    original = reference.rows_forward

    def spy(x: Tensor, w: Tensor, idx: Tensor, bias: Tensor | None, keep: bool) -> tuple[Tensor, Tensor | None]:
        seen.append(w)
        return original(x, w, idx, bias, keep)

    monkeypatch.setattr(reference, "rows_forward", spy)
    rows_matmul(x, stored, idx, transposed=True)
    assert seen[0].data_ptr() == stored.data_ptr() and seen[0].shape == (OUT, IN)


def test_autocast_computes_in_the_autocast_dtype_and_keeps_fp32_grads() -> None:
    _, w, idx, x, bias = _case("rows", K, torch.float32, False)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rows_matmul(x, w, idx, bias)
        expected = torch.nn.functional.linear(x, w[idx], bias[idx])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("kind", ["rows", "cols"])
@pytest.mark.parametrize(("k", "kept"), [(K, True), (None, False)], ids=["k-small", "k-full"])
def test_torch_backward_reuses_a_small_forward_slice(monkeypatch, kind, k, kept) -> None:
    """A slice no larger than the bigger activation (k <= tokens here) is kept from the forward; a
    larger one is gathered again in backward. Both give the dense-masked gradients (tested above)."""
    w, stored, idx, a, _ = _case(kind, k, torch.float32, False)
    seen = []
    name = f"{kind}_input_grad"
    original = getattr(reference, name)

    def spy(g: Tensor, w: Tensor, idx: Tensor, kept_slice: Tensor | None = None) -> Tensor:
        seen.append(kept_slice)
        return original(g, w, idx, kept_slice)

    monkeypatch.setattr(reference, name, spy)
    a.requires_grad_()
    sparse_matmul(kind, a, stored, idx, backend="torch").sum().backward()
    assert (seen[0] is not None) == kept
    if kept:
        assert torch.equal(seen[0], w[idx] if kind == "rows" else w[:, idx])


def test_no_slice_is_kept_without_an_input_gradient(monkeypatch) -> None:
    _, w, idx, x, bias = _case("rows", K, torch.float32, False)
    bias.requires_grad_()
    seen = []
    original = reference.rows_forward

    def spy(x: Tensor, w: Tensor, idx: Tensor, bias: Tensor | None, keep: bool) -> tuple[Tensor, Tensor | None]:
        seen.append(keep)
        return original(x, w, idx, bias, keep)

    monkeypatch.setattr(reference, "rows_forward", spy)
    rows_matmul(x, w, idx, bias).sum().backward()
    assert seen == [False] and bias.grad is not None


# --- token rows -------------------------------------------------------------------------------

MASKS = {
    "prefix": [1] * 7 + [0] * 3,  # one prompt, then its answer
    "sft-batch": [1, 1, 1, 0, 0, 1, 1, 0, 0, 0],  # two samples: prompt, answer (+ padding)
    "fragmented": [1, 0] * 5,
    "ends-context": [0, 0, 1, 1, 1, 0, 1, 1, 1, 1],
    "all-context": [1] * 10,
    "no-context": [0] * 10,
}


@pytest.fixture(params=["runs", "positions"])
def row_path(request, monkeypatch) -> str:
    """Force TokenRows onto one of its two paths, whatever the width."""
    monkeypatch.setattr(token_rows, "_RUN_ELEMENTS", 0 if request.param == "runs" else 10**9)
    return request.param


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("with_columns", [False, True], ids=["rows", "rows+columns"])
def test_token_rows_split_and_merge_match_boolean_indexing(row_path, mask_name, with_columns) -> None:
    mask = torch.tensor(MASKS[mask_name], dtype=torch.bool)
    rows = TokenRows(mask)
    assert (rows.context_rows, rows.other_rows) == (int(mask.sum()), int((~mask).sum()))
    g = torch.Generator().manual_seed(0)
    width = 6
    columns = torch.tensor([1, 4]) if with_columns else None

    def restrict(t: Tensor) -> Tensor:
        return t if columns is None else t[:, columns]

    # split: forward is indexing, backward puts each group's gradient back in its rows
    x = torch.randn(mask.numel(), width, generator=g, requires_grad=True)
    context, other = rows.split(x, columns)
    torch.testing.assert_close(context, restrict(x[mask]), rtol=0, atol=0)
    torch.testing.assert_close(other, x[~mask], rtol=0, atol=0)
    upstream_c, upstream_o = torch.randn(context.shape, generator=g), torch.randn(other.shape, generator=g)
    ((context * upstream_c).sum() + (other * upstream_o).sum()).backward()
    x_ref = x.detach().clone().requires_grad_()
    ((restrict(x_ref[mask]) * upstream_c).sum() + (x_ref[~mask] * upstream_o).sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)

    # merge: the inverse, zero in the context rows' other columns
    context = context.detach().clone().requires_grad_()
    other = other.detach().clone().requires_grad_()
    merged = rows.merge(context, other, columns, width)
    expected = torch.zeros(mask.numel(), width)
    expected[~mask] = other.detach()
    if columns is None:
        expected[mask] = context.detach()
    else:
        expected[mask.nonzero().squeeze(1)[:, None], columns] = context.detach()
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)
    upstream = torch.randn(merged.shape, generator=g)
    (merged * upstream).sum().backward()
    for group, expected_grad in ((context, restrict(upstream[mask])), (other, upstream[~mask])):
        if group.numel() or group.grad is not None:  # an empty group, passed over untouched, gets no gradient
            torch.testing.assert_close(group.grad, expected_grad, rtol=0, atol=0)


def test_token_rows_take_one_run_as_a_view() -> None:
    rows = TokenRows(torch.tensor(MASKS["prefix"], dtype=torch.bool))
    x = torch.randn(10, token_rows._RUN_ELEMENTS)  # wide enough for the runs path
    context, other = rows.split(x)
    assert context.data_ptr() == x.data_ptr() and other.data_ptr() == x[7:].data_ptr()


def test_token_rows_refuse_a_bad_mask_or_shape() -> None:
    with pytest.raises(ValueError, match="1-D bool"):
        TokenRows(torch.ones(2, 3, dtype=torch.bool))
    rows = TokenRows(torch.tensor(MASKS["prefix"], dtype=torch.bool))
    with pytest.raises(ValueError, match="split needs"):
        rows.split(torch.randn(9, 4))
    with pytest.raises(ValueError, match="merge needs"):
        rows.merge(torch.randn(6, 4), torch.randn(3, 4))


def _tiny_sparse_llama(sparse_output_tokens: bool) -> tuple[torch.nn.Module, Tensor]:
    """A 2-layer LLaMA with LoRA, its MLPs and attention wrapped sparse (oracle), and a mask of
    several runs per sample as in an SFT batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_sft import LoRAConfig, inject_lora, lora_layers
    from lightning_sft.anatomy import describe
    from lightning_sft.sparsity import SparsityState, sparsify

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    inject_lora(model, LoRAConfig(r=4))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    mask = torch.tensor([MASKS["sft-batch"], MASKS["ends-context"]], dtype=torch.bool)
    state = SparsityState(active=True, context_mask=mask, sparse_output_tokens=sparse_output_tokens)
    anatomy = describe(model)
    assert len(sparsify(model, anatomy.mlps, [0.5, 0.75], state, "oracle")) == 2
    assert len(sparsify(model, anatomy.attentions, [0.5, 0.5], state, "oracle")) == 2
    return model, mask


@pytest.mark.parametrize("sparse_output_tokens", [False, True])
def test_sparse_layers_give_the_same_results_on_both_row_paths(monkeypatch, sparse_output_tokens) -> None:
    """The runs path (views and cat) and the positions path (index_select/index_copy_) feed the
    same rows in the same order to the same products: bit-identical outputs and gradients. The
    sparse-layer tests check the positions path (their widths are small) against the dense
    computation with the dropped channels zeroed."""
    model, mask = _tiny_sparse_llama(sparse_output_tokens)
    embeds = torch.randn(*mask.shape, 32, generator=torch.Generator().manual_seed(1))
    results = {}
    for path, elements in (("runs", 0), ("positions", 10**9)):
        monkeypatch.setattr(token_rows, "_RUN_ELEMENTS", elements)
        model.zero_grad(set_to_none=True)
        x = embeds.clone().requires_grad_()
        logits = model(inputs_embeds=x).logits
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[path] = (logits.detach(), x.grad, grads)
    runs, positions = results["runs"], results["positions"]
    torch.testing.assert_close(runs[0], positions[0], rtol=0, atol=0)
    torch.testing.assert_close(runs[1], positions[1], rtol=0, atol=0)
    assert runs[2].keys() == positions[2].keys() and runs[2]
    for name in runs[2]:
        torch.testing.assert_close(runs[2][name], positions[2][name], rtol=0, atol=0, msg=name)


# --- dispatch -------------------------------------------------------------------------------


def test_auto_picks_torch_on_cpu() -> None:
    assert resolve_backend("auto", CPU, torch.float32) == "torch"
    assert "torch" in available_backends()
    _, w, idx, x, bias = _case("rows", K, torch.float32, False)
    assert torch.equal(rows_matmul(x, w, idx, bias), rows_matmul(x, w, idx, bias, backend="torch"))


def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, w, idx, x, _ = _case("rows", K, torch.float32, False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rows_matmul(x, w, idx, backend="triton")


def _no_compute(*args: object) -> Tensor:
    raise AssertionError("compute ran before the arguments were checked")


@pytest.mark.parametrize(
    ("make_idx", "message"),
    [
        (lambda: torch.tensor([0, OUT]), "outside"),
        (lambda: torch.tensor([-1, 3]), "outside"),
        (lambda: torch.tensor([0, 3], dtype=torch.int32), "int64"),
        (lambda: torch.tensor([[0, 3]]), "1-D"),
        (lambda: torch.tensor([3, 0]), "sorted and unique"),
        (lambda: torch.tensor([3, 3]), "sorted and unique"),
        (lambda: torch.tensor([0, 3], device="meta"), "device|meta"),
        (lambda: [0, 3], "1-D int64 tensor"),
    ],
    ids=["too-big", "negative", "int32", "2d", "unsorted", "duplicate", "device", "list"],
)
def test_bad_idx_raises_before_compute(monkeypatch, make_idx, message) -> None:
    monkeypatch.setattr(reference, "rows_forward", _no_compute)
    _, w, _, x, _ = _case("rows", K, torch.float32, False)
    with pytest.raises(ValueError, match=message):
        rows_matmul(x, w, make_idx())


def test_trainable_weight_is_refused() -> None:
    _, w, idx, x, _ = _case("rows", K, torch.float32, False)
    with pytest.raises(ValueError, match="frozen weights only"):
        rows_matmul(x, w.requires_grad_(), idx)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "diagonal"}, "kind"),
        ({"backend": "cuda"}, "backend"),
        ({"a": torch.randn(TOKENS, IN + 1)}, "in_features"),
        ({"a": torch.randn(TOKENS, IN, dtype=torch.float64)}, "dtypes differ"),
        ({"bias": torch.randn(K)}, "full layer bias"),
        ({"weight": torch.zeros(OUT, IN, 1)}, "2-D"),
    ],
    ids=["kind", "backend", "width", "dtype", "bias", "weight"],
)
def test_bad_arguments_raise_value_error(monkeypatch, kwargs, message) -> None:
    monkeypatch.setattr(reference, "rows_forward", _no_compute)
    _, w, idx, x, _ = _case("rows", K, torch.float32, False)
    args = {"kind": "rows", "a": x, "weight": w, "idx": idx, "bias": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        sparse_matmul(**args)


@pytest.mark.parametrize("tokens", [3, 64], ids=["slice-regathered", "slice-kept"])
def test_fused_rows_match_one_rows_matmul_per_weight(tokens: int) -> None:
    """One gather-GEMM over several weights that read one input equals a rows_matmul per weight:
    outputs, the input gradient and a trainable bias's gradient (dropped rows get none), whether the
    forward's slice is kept for backward (many tokens) or gathered again (few)."""
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(12, IN, generator=g), torch.randn(7, IN, generator=g), torch.randn(IN, 9, generator=g)]
    transposed = [False, False, True]
    indices = [torch.tensor([9, 1, 4]), torch.tensor([0, 6]), torch.tensor([8, 2, 5, 3])]
    bias = torch.randn(12, generator=g, requires_grad=True)
    biases = [bias, None, torch.randn(9, generator=g)]
    x = torch.randn(tokens, IN, generator=g, requires_grad=True)
    upstream = [torch.randn(tokens, idx.numel(), generator=g) for idx in indices]

    def grads(outs: list[Tensor]) -> tuple[Tensor, Tensor]:
        x.grad = bias.grad = None
        sum((o * u).sum() for o, u in zip(outs, upstream)).backward()
        return x.grad.clone(), bias.grad.clone()

    fused = fused_rows_matmul(x, weights, indices, biases, transposed)
    fused_grads = grads(fused)
    single = [rows_matmul(x, w, i, b, transposed=t, check_idx=False)
              for w, i, b, t in zip(weights, indices, biases, transposed)]
    single_grads = grads(single)
    for a, b in zip(fused, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, single_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(fused_grads[1]) == 3  # only the kept rows of the first bias


# --- Triton kernels under the interpreter -----------------------------------------------------


def test_triton_kernels_match_torch_under_the_interpreter() -> None:
    """TRITON_INTERPRET must be set before the kernels are built, so they run in a fresh process."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interpreter checks passed" in proc.stdout


def _interpreter_checks() -> None:
    """Every product (both forwards, both input gradients, bias epilogue) against the torch path."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert "triton" in available_backends()
    assert resolve_backend("auto", CPU, torch.float32) == "torch"
    assert resolve_backend("triton", CPU, torch.float16) == "triton"
    assert sys.modules["lightning_sft.kernels.triton_gather"].INTERPRETED
    start, cases = time.perf_counter(), 0
    shapes = [(TOKENS, IN, OUT, K), (TOKENS, IN, OUT, None), (1, 16, 16, 1), (5, 20, 9, 0), (0, 20, 9, 4)]
    for dtype in (torch.float32, torch.float16):
        for transposed in (False, True):
            for kind in ("rows", "cols"):
                for tokens, n_in, n_out, k in shapes:
                    w, stored, idx, a, bias = _case(kind, k, dtype, transposed, 0, tokens, n_in, n_out)
                    for with_bias in (False, True):
                        b = bias if with_bias else None
                        got = _run(kind, a, stored, idx, b, transposed=transposed, backend="triton")
                        want = _run(kind, a, stored, idx, b, transposed=transposed, backend="torch")
                        for name, x, y in zip(("output", "grad_a", "grad_bias"), got, want):
                            if y is not None:
                                where = f"{name} {kind} {dtype} {transposed=} {(tokens, n_in, n_out, k)=}"
                                assert x.dtype == y.dtype and x.shape == y.shape, where
                                torch.testing.assert_close(x, y, **_tol(dtype), msg=where)
                        cases += 1
    # Strided operands: a transposed activation and a stride-0 upstream gradient (from .sum()).
    _, w, idx, _, bias = _case("rows", K, torch.float32, False)
    x = torch.randn(IN, TOKENS).t().requires_grad_()
    rows_matmul(x, w, idx, bias, backend="triton").sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(TOKENS, K) @ w[idx], **_tol(torch.float32))
    # Fused layouts pass rows in slice order, not sorted (check_idx=False): the kernels only gather.
    for kind, product in (("rows", rows_matmul), ("cols", cols_matmul)):
        _, w, idx, a, bias = _case(kind, K, torch.float32, False, seed=3)
        shuffled = idx.flip(0)
        a = a if kind == "rows" else a.flip(-1)  # cols: the activation holds the channels in idx's order
        got = product(a, w, shuffled, bias, backend="triton", check_idx=False)
        want = product(a, w, shuffled, bias, backend="torch", check_idx=False)
        torch.testing.assert_close(got, want, **_tol(torch.float32), msg=f"unsorted {kind}")
    # fused_rows_matmul runs per weight on this backend, the result the torch backend's one GEMM gives.
    _, w, idx, x, bias = _case("rows", K, torch.float32, False, seed=4)
    parts = ([w, w.flip(0)], [idx.flip(0), idx], [bias, None], [False, False])
    for got, want in zip(fused_rows_matmul(x, *parts, backend="triton"), fused_rows_matmul(x, *parts, backend="torch")):
        torch.testing.assert_close(got, want, **_tol(torch.float32), msg="fused rows")
    with_bf16 = _case("rows", K, torch.bfloat16, False)
    try:
        rows_matmul(with_bf16[3], with_bf16[1], with_bf16[2], backend="triton")
    except ValueError as err:
        assert "interpreter" in str(err)
    else:
        raise AssertionError("bf16 under the interpreter must be refused")
    print(f"interpreter checks passed: {cases} cases in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    _interpreter_checks()
