"""The Liger backend of ``linear_cross_entropy``: the backend rule as a pure function (no CUDA needed), its
refusals through the entry point, and Liger's Triton kernel against the torch path under the Triton
interpreter (in a subprocess) and on CUDA (skipped without one).

Run as a script (with TRITON_INTERPRET=1) this file performs the interpreter checks itself.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lightning_sft.losses import linear_cross_entropy
from lightning_sft.losses.liger import liger_kernels, resolve_backend, unsupported

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None  # found without importing it (seconds)
N, H, V = 16, 32, 64


def _not_asked() -> None:
    raise AssertionError("the rule asked for Liger's kernels where the answer did not depend on them")


def _kernels(where: str | None) -> Callable[[], str | None]:
    return lambda: where


# --- the rule ----------------------------------------------------------------------------------------


def test_auto_takes_liger_only_for_a_supported_one_term_head_on_cuda_with_compiled_kernels() -> None:
    # Off CUDA, for a LoRA head or an unsupported call the rule answers without importing liger-kernel.
    assert resolve_backend("auto", CPU, 1, None, _not_asked) == "torch"
    assert resolve_backend("auto", CUDA, 2, None, _not_asked) == "torch"
    assert resolve_backend("auto", CUDA, 1, "chunk_size=8 ...", _not_asked) == "torch"
    assert resolve_backend("torch", CUDA, 1, None, _not_asked) == "torch"
    assert resolve_backend("auto", CUDA, 1, None, _kernels(None)) == "torch"  # not installed
    assert resolve_backend("auto", CUDA, 1, None, _kernels("interpreter")) == "torch"  # never the interpreter
    assert resolve_backend("auto", CUDA, 1, None, _kernels("cuda")) == "liger"


def test_explicit_liger_runs_on_cuda_and_on_cpu_only_under_the_interpreter(monkeypatch) -> None:
    assert resolve_backend("liger", CUDA, 1, None, _kernels("cuda")) == "liger"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("liger", CPU, 1, None, _kernels("interpreter")) == "liger"


REFUSALS = [
    (dict(device=CUDA, terms=2), "interpreter", ValueError, r"one term.*LoRA head.*backend='torch'"),
    (dict(device=CUDA, why_not="chunk_size=8 sets"), "cuda", ValueError, r"chunk_size=8 sets.*backend='torch'"),
    (dict(device=CPU), None, RuntimeError, r"got cpu tensors.*TRITON_INTERPRET=1.*backend='torch'"),
    (dict(device=torch.device("meta")), "cuda", RuntimeError, "got meta tensors"),
    (dict(device=CUDA), None, RuntimeError, r"pip install 'lightning-sft\[liger\]'.*backend='torch'"),
    (dict(device=CPU, interpret=True), "cuda", RuntimeError, "TRITON_INTERPRET=1 was set after"),
]


@pytest.mark.parametrize(("case", "kernels", "error", "match"), REFUSALS,
                         ids=["lora-head", "unsupported", "cpu", "meta", "not-installed", "interpreter-too-late"])
def test_explicit_liger_that_cannot_run_names_the_fix(monkeypatch, case, kernels, error, match) -> None:
    if case.get("interpret"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(error, match=match):
        resolve_backend("liger", case["device"], case.get("terms", 1), case.get("why_not"), _kernels(kernels))


def test_unsupported_names_what_liger_would_compute_differently() -> None:
    assert unsupported(torch.bfloat16, None, False) is None
    assert "chunk_size=8" in unsupported(torch.float32, 8, False)
    assert "float64" in unsupported(torch.float64, None, False)
    assert "the head needs a gradient" in unsupported(torch.float32, None, True)


# --- through linear_cross_entropy --------------------------------------------------------------------


def _inputs(dtype: torch.dtype = torch.float32, device: torch.device = CPU, seed: int = 0) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / math.sqrt(H)).to(device, dtype).requires_grad_()
    bias = torch.randn(V, generator=gen).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::5] = -100
    return hidden, weight, bias, labels.to(device)


def test_auto_on_cpu_is_the_torch_path() -> None:
    hidden, weight, bias, labels = _inputs()
    auto = linear_cross_entropy(hidden, weight, labels, bias)
    torch_path = linear_cross_entropy(hidden, weight, labels, bias, backend="torch")
    assert torch.equal(auto, torch_path)
    params = (hidden, weight, bias)
    for a, b in zip(torch.autograd.grad(auto, params), torch.autograd.grad(torch_path, params)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda h, w, b, y: linear_cross_entropy(h, w, y, b, backend="cuda"), ValueError, "backend must be one of"),
        (lambda h, w, b, y: linear_cross_entropy([h, h[:, :4]], [w, w[:, :4]], y, backend="liger"), ValueError,
         "one term"),
        (lambda h, w, b, y: linear_cross_entropy(h, w, y, b, chunk_size=8, backend="liger"), ValueError,
         "chunk_size=8 sets the torch path's chunks"),
        (lambda h, w, b, y: linear_cross_entropy(h.double(), w.double(), y, backend="liger"), ValueError,
         "float64"),
        (lambda h, w, b, y: linear_cross_entropy(h.detach(), w, y, b, backend="liger"), ValueError,
         "the head needs a gradient and the hidden states do not"),
        (lambda h, w, b, y: linear_cross_entropy(h, w, y, b, backend="liger"), RuntimeError, "TRITON_INTERPRET=1"),
    ],
    ids=["unknown", "lora-head", "chunk", "fp64", "head-grads-only", "cpu"],
)
def test_the_entry_point_refuses_a_liger_call_it_cannot_make(monkeypatch, call, error, match) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(error, match=match):
        call(*_inputs())


def test_under_no_grad_hidden_states_without_gradient_are_no_refusal(monkeypatch) -> None:
    """No gradient is wanted under no_grad, so only the CPU is refused (not "the head needs a gradient")."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, bias, labels = _inputs()
    with torch.no_grad(), pytest.raises(RuntimeError, match="got cpu tensors"):
        linear_cross_entropy(hidden, weight, labels, bias, backend="liger")


# --- Liger's kernel against the torch path -----------------------------------------------------------

# Loss and gradients of hidden, weight and bias. fp32: two chunked fp32 reductions (measured under the
# interpreter: <= 4.8e-7 absolute, 2.5e-7 of the largest entry); fp16 / bf16: both round the fp32 softmax
# gradient to the weights' dtype once before the products, and differ by a rounding there (measured: fp16
# <= 2.0e-3 absolute, 5.8e-4 of the largest entry; bf16 <= 3.1e-2, 7.8e-3: one bf16 step at 4).
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-2, atol=1e-3),
              torch.bfloat16: dict(rtol=2e-2, atol=4e-3)}


def _liger_in_graph(loss: Tensor) -> bool:
    """Whether Liger's autograd Function computed ``loss`` (so a comparison is not torch against torch)."""
    nodes = [loss.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is not None:
            if "Liger" in type(node).__name__:
                return True
            nodes += [parent for parent, _ in node.next_functions]
    return False


def _compare(device: torch.device, dtype: torch.dtype, smoothing: float, reduction: str, with_bias: bool,
             ignore_index: int, scale: float) -> None:
    hidden, weight, bias, labels = _inputs(dtype, device)
    labels = labels.masked_fill(labels == -100, ignore_index)
    b = bias if with_bias else None
    params = [hidden, weight] + ([bias] if with_bias else [])
    where = f"{dtype} {smoothing=} {reduction=} {with_bias=} {ignore_index=} {scale=}"
    results = []
    for backend in ("liger", "torch"):
        loss = linear_cross_entropy(hidden.view(2, N // 2, H), weight, labels.view(2, N // 2), b,
                                    ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction,
                                    backend=backend)
        results.append((loss, *torch.autograd.grad(loss * scale, params)))  # scale != 1: Liger rescales in backward
    assert _liger_in_graph(results[0][0]) and not _liger_in_graph(results[1][0]), where
    for name, got, want in zip(("loss", "grad hidden", "grad weight", "grad bias"), *results):
        assert got.dtype == want.dtype and got.shape == want.shape, f"{name} {where}"
        torch.testing.assert_close(got, want, **TOLERANCES[dtype], msg=f"{name} {where}")


def _cases(dtypes: tuple[torch.dtype, ...]) -> list[tuple]:
    return [(dtype, smoothing, reduction, with_bias, ignore_index, scale)
            for dtype in dtypes for smoothing in (0.0, 0.1) for reduction in ("mean", "sum")
            for with_bias, ignore_index, scale in ((True, -100, 1.0), (False, 7, 0.5))]


def _liger_matches_torch(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> int:
    """Every case on ``device``, all-ignored labels and a frozen head too; returns the number of cases."""
    cases = _cases(dtypes)
    assert cases
    for case in cases:
        _compare(device, *case)
    hidden, weight, _, labels = _inputs(device=device)
    none = torch.full_like(labels, -100)
    unlabelled = linear_cross_entropy(hidden, weight, none, backend="liger")
    assert _liger_in_graph(unlabelled) and unlabelled.isnan()  # as F.cross_entropy (Liger's own mean: 0)
    weight.requires_grad_(False)
    losses = [linear_cross_entropy(hidden, weight, labels, backend=b) for b in ("liger", "torch")]
    assert _liger_in_graph(losses[0])
    grads = [torch.autograd.grad(loss, hidden)[0] for loss in losses]
    torch.testing.assert_close(grads[0], grads[1], **TOLERANCES[torch.float32])
    return len(cases) + 2


@pytest.mark.skipif(not HAS_LIGER, reason="needs liger-kernel (pip install 'lightning-sft[liger]')")
def test_liger_matches_the_torch_path_under_the_interpreter() -> None:
    """TRITON_INTERPRET must be set before liger-kernel builds its kernels, so they run in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interpreter checks passed" in proc.stdout


@pytest.mark.skipif(not (HAS_LIGER and torch.cuda.is_available()), reason="needs CUDA and liger-kernel")
def test_liger_matches_the_torch_path_on_cuda() -> None:
    assert liger_kernels() == "cuda" and resolve_backend("auto", CUDA, 1, None) == "liger"
    assert _liger_matches_torch(CUDA, (torch.float32, torch.bfloat16, torch.float16)) > 0


def _fused_loss_matches_the_models_own() -> None:
    """``FusedLoss(backend="liger")`` inside a causal LM: its own loss and gradients (3-D hidden states, shift)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "helpers"))
    import family_models

    from lightning_sft.recipes.fused_loss import FusedLoss

    model = family_models.build("LLaMA").train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(12) < 4, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    results = []
    for fused in (None, FusedLoss([model], backend="liger")):
        if fused is not None:
            fused.install()
        out = model(input_ids=ids, labels=labels)
        results.append((out.loss, *torch.autograd.grad(out.loss, params)))
        if fused is not None:
            fused.remove()
            assert out.logits is None and _liger_in_graph(out.loss)
    for own, got in zip(*results):
        torch.testing.assert_close(got, own, **TOLERANCES[torch.float32])


def _interpreter_checks() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    start = time.perf_counter()
    assert liger_kernels() == "interpreter"
    assert resolve_backend("auto", CPU, 1, None) == "torch" and resolve_backend("liger", CPU, 1, None) == "liger"
    imported = time.perf_counter()
    cases = _liger_matches_torch(CPU, (torch.float32, torch.float16, torch.bfloat16))
    _fused_loss_matches_the_models_own()
    done = time.perf_counter()
    took = f"{done - imported:.1f} s (import {imported - start:.1f} s)"
    print(f"interpreter checks passed: {cases} cases and a causal LM in {took}")


if __name__ == "__main__":
    _interpreter_checks()
