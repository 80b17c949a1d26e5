"""Gather-GEMM kernels: the Triton kernels checked against the torch reference, then timed.

The contextual-sparsity layers spend their frozen-weight time in four gather-GEMMs
(``lightning_sft.kernels``). A kernel is only worth having if it is right and close to the
ideal, a dense GEMM on a slice of the weight that already sits contiguous in memory. So, for
each LLaMA projection, dtype and sparsity this benchmark checks the Triton forward output and
input gradient (through ``sparse_matmul``) against ``backend="torch"``, then times both
products four ways: the Triton kernel, the torch backend (``index_select`` + matmul), the
GEMM on a pre-made contiguous slice (the ideal) and the full dense GEMM.

On a GPU the shapes are LLaMA-3-8B's and the timings are CUDA events. Without one the Triton
kernels can only run under the Triton interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before triton is imported: the command then re-runs itself in a
subprocess with the variable set, on small shapes, where the check is what counts and only the
torch timings mean anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sft.bench.common import run_and_report
from lightning_sft.bench.timing import interleaved, summarize
from lightning_sft.kernels import reference, sparse_matmul
from lightning_sft.kernels.dispatch import interpreter_requested
from lightning_sft.sparsity import kept_channels
from lightning_sft.validation import int_at_least

NAME = "kernels"
HELP = "Triton gather-GEMM kernels against the torch reference: correctness, then time against sliced and full dense GEMMs"

# LLaMA-3-8B on a GPU; small enough for the Triton interpreter on CPU.
GPU_SHAPES = {"hidden": 4096, "intermediate": 14336, "kv": 1024, "tokens": 2048}
CPU_SHAPES = {"hidden": 64, "intermediate": 128, "kv": 16, "tokens": 32}
SHAPE_HELP = {
    "hidden": "hidden size (q and o are hidden x hidden)",
    "intermediate": "MLP intermediate size",
    "kv": "k/v projection output width (kv heads x head dim)",
    "tokens": "activation rows (tokens)",
}
# name -> (kind, output width, input width), as attributes of the settings.
PROJECTIONS: dict[str, tuple[str, str, str]] = {
    "gate_up": ("rows", "intermediate", "hidden"),
    "down": ("cols", "hidden", "intermediate"),
    "q": ("rows", "hidden", "hidden"),
    "k_v": ("rows", "kv", "hidden"),
    "o": ("cols", "hidden", "hidden"),
}
DEFAULT_SPARSITIES = (0.5, 0.75, 0.9, 0.99)
GPU_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (rtol, atol) of the elementwise check |triton - torch| <= atol + rtol * |torch|. Inputs are
# scaled so outputs are O(1); both sides accumulate in fp32, so they differ by output rounding.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 4e-2)}
VARIANTS = ("triton", "torch", "sliced", "dense")
INTERPRETER_NOTE = "interpreter: correctness only, timings not meaningful"
# The re-run under the interpreter: this same command, its flags resolved, in a fresh process.
_CHILD = "import sys; from lightning_sft.cli.bench import main; sys.exit(main(['kernels', *sys.argv[1:]]))"


@dataclass(frozen=True)
class KernelBenchSettings:
    """Shapes, sparsities and timing rounds (shape defaults depend on the device, see ``GPU_SHAPES``)."""

    hidden: int
    intermediate: int
    kv: int
    tokens: int
    sparsities: tuple[float, ...]
    projections: tuple[str, ...]
    warmup: int
    reps: int
    seed: int


def _on_gpu() -> bool:
    """CUDA, unless the interpreter was asked for (it runs the kernels on CPU tensors)."""
    return torch.cuda.is_available() and not interpreter_requested()


def _sparsities(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in [0, 1); got {text!r}") from error
    if not values or not all(0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"each sparsity (fraction of channels skipped) must be in [0, 1); got {text!r}"
        )
    return values


def _projections(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in PROJECTIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown projection {unknown or text!r}; choose from {', '.join(PROJECTIONS)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, text in SHAPE_HELP.items():
        parser.add_argument(
            f"--{name}", type=int_at_least(1), default=None,
            help=f"{text} (default {GPU_SHAPES[name]} on CUDA, {CPU_SHAPES[name]} on CPU)",
        )
    parser.add_argument(
        "--sparsities", type=_sparsities, default=DEFAULT_SPARSITIES,
        help=f"comma-separated fractions of channels skipped, each in [0, 1) (default {','.join(map(str, DEFAULT_SPARSITIES))})",
    )
    parser.add_argument(
        "--projections", type=_projections, default=tuple(PROJECTIONS),
        help=f"comma-separated subset of {', '.join(PROJECTIONS)} (default all)",
    )
    parser.add_argument("--warmup", type=int_at_least(0), default=5, help="untimed rounds (default 5)")
    parser.add_argument("--reps", type=int_at_least(1), default=20, help="timed rounds; the median is reported (default 20)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed for weights, activations and indices (default 0)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lightning-sft bench kernels``."""
    if importlib.util.find_spec("triton") is None:
        print("lightning-sft bench kernels checks the Triton kernels, and triton is not installed: run"
              " `pip install triton` (or `pip install -e '.[dev]'`).", file=sys.stderr)
        return 1
    shapes = GPU_SHAPES if _on_gpu() else CPU_SHAPES
    settings = KernelBenchSettings(
        **{name: shapes[name] if getattr(args, name) is None else getattr(args, name) for name in shapes},
        sparsities=args.sparsities, projections=args.projections, warmup=args.warmup, reps=args.reps, seed=args.seed,
    )
    if not torch.cuda.is_available() and not interpreter_requested():
        return _rerun_under_interpreter(settings, args.threads, args.json)
    result: dict[str, Any] = {}

    def measure() -> dict[str, Any]:
        result.update(benchmark(settings))
        return result

    run_and_report(args.threads, args.json, measure, format_report)
    return 0 if result["passed"] else 1


def _flags(settings: KernelBenchSettings, threads: int | None, json_path: str | None) -> list[str]:
    """Command-line flags that give ``settings`` (and the run options) back."""
    flags = []
    for name, value in dataclasses.asdict(settings).items():
        flags += [f"--{name}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    if threads is not None:
        flags += ["--threads", str(threads)]
    if json_path is not None:
        flags += ["--json", json_path]
    return flags


def _rerun_under_interpreter(settings: KernelBenchSettings, threads: int | None, json_path: str | None) -> int:
    """This command in a fresh process with ``TRITON_INTERPRET=1``, which must be set before triton
    is imported; its output is passed on and its exit code returned."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-c", _CHILD, *_flags(settings, threads, json_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


def _median_ms(variants: dict[str, Callable[[], object]], warmup: int, reps: int, gpu: bool) -> dict[str, float]:
    """Median milliseconds per call of each variant, one call of each in turn per round after
    ``warmup`` untimed rounds: CUDA events around each call on a GPU, wall clock on CPU. On CPU the
    interpreter ("triton") gets rounds of its own: its numpy work between the torch variants would
    evict their operands from cache and slow them about tenfold."""
    if not gpu:
        rest = {name: fn for name, fn in variants.items() if name != "triton"}
        times = {**interleaved({"triton": variants["triton"]}, steps=reps, warmup=warmup),
                 **interleaved(rest, steps=reps, warmup=warmup)}
        return {name: summarize(samples).median * 1e3 for name, samples in times.items()}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    events = {name: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
              for name in variants}
    for rep in range(reps):
        for name, fn in variants.items():
            start, end = events[name][rep]
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize()
    return {name: statistics.median(start.elapsed_time(end) for start, end in pairs) for name, pairs in events.items()}


def _through_sparse_matmul(kind: str, a: Tensor, w: Tensor, idx: Tensor, g: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Forward output and input gradient (upstream ``g``) as a layer gets them."""
    x = a.detach().requires_grad_()
    out = sparse_matmul(kind, x, w, idx, backend=backend)
    out.backward(g)
    return out.detach(), x.grad


def _check(got: Tensor, want: Tensor, dtype: torch.dtype) -> tuple[float, bool]:
    """Max abs error and whether every element is within the dtype's tolerance."""
    rtol, atol = TOLERANCES[dtype]
    if got.shape != want.shape or got.dtype != want.dtype:
        return math.inf, False
    got, want = got.float(), want.float()
    err = float((got - want).abs().max()) if want.numel() else 0.0
    return err, bool(torch.isclose(got, want, rtol=rtol, atol=atol).all())


def _rows(
    name: str, settings: KernelBenchSettings, dtypes: list[torch.dtype], ops: ModuleType, device: torch.device, gpu: bool
) -> list[dict[str, Any]]:
    """Check and time one projection at every dtype and sparsity: one row per product."""
    kind, out_attr, in_attr = PROJECTIONS[name]
    n_out, n_in, tokens = getattr(settings, out_attr), getattr(settings, in_attr), settings.tokens
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    # O(1) outputs: unit activations, weights scaled by 1/sqrt(fan-in).
    w32 = torch.randn(n_out, n_in, generator=gen, device=device) / math.sqrt(n_in)
    a32 = torch.randn(tokens, n_in, generator=gen, device=device)  # the full-width input
    g32 = torch.randn(tokens, n_out, generator=gen, device=device)  # the full-width upstream gradient
    width = n_out if kind == "rows" else n_in
    indices = {s: torch.randperm(width, generator=gen, device=device)[: kept_channels(width, s)].sort().values
               for s in settings.sparsities}
    forward, input_grad = (ops.rows_forward, ops.rows_input_grad) if kind == "rows" else (ops.cols_forward, ops.cols_input_grad)
    ref_forward, ref_input_grad = ((reference.rows_forward, reference.rows_input_grad) if kind == "rows"
                                   else (reference.cols_forward, reference.cols_input_grad))
    rows = []
    for dtype in dtypes:
        w, a_full, g_full = w32.to(dtype), a32.to(dtype), g32.to(dtype)
        for sparsity, idx in indices.items():
            if kind == "rows":  # output channels idx: the input is full, the upstream gradient sliced
                a, g, w_sliced = a_full, g_full[:, idx].contiguous(), w[idx].contiguous()
            else:  # input channels idx: the input is sliced, the upstream gradient full
                a, g, w_sliced = a_full[:, idx].contiguous(), g_full, w[:, idx].contiguous()
            got = _through_sparse_matmul(kind, a, w, idx, g, "triton")
            want = _through_sparse_matmul(kind, a, w, idx, g, "torch")
            # The backends' product functions, called directly: no autograd or argument checks timed.
            timed = {
                "forward": {
                    "triton": lambda: forward(a, w, idx, None),
                    "torch": lambda: ref_forward(a, w, idx, None),
                    "sliced": lambda: F.linear(a, w_sliced),
                    "dense": lambda: F.linear(a_full, w),
                },
                "input grad": {
                    "triton": lambda: input_grad(g, w, idx),
                    "torch": lambda: ref_input_grad(g, w, idx),
                    "sliced": lambda: g @ w_sliced,
                    "dense": lambda: g_full @ w,
                },
            }
            for (product, variants), got_t, want_t in zip(timed.items(), got, want):
                err, passed = _check(got_t, want_t, dtype)
                ms = _median_ms(variants, settings.warmup, settings.reps, gpu)
                rows.append({
                    "projection": name, "kind": kind, "out": n_out, "in": n_in, "dtype": DTYPE_NAMES[dtype],
                    "sparsity": sparsity, "k": idx.numel(), "product": product, "max_err": err, "passed": passed,
                    "ms": ms,
                    # The interpreter's times say nothing about a GPU, so no ratios are drawn from them.
                    "triton_vs_sliced": ms["triton"] / ms["sliced"] if gpu else None,
                    "speedup_vs_dense": ms["dense"] / ms["triton"] if gpu else None,
                })
    return rows


def benchmark(settings: KernelBenchSettings) -> dict[str, Any]:
    """Check and time every projection, dtype and sparsity; returns JSON-serialisable results."""
    import triton

    # Imported here, after the mode is known (the interpreter must be set before the kernels are built).
    from lightning_sft.kernels import triton_gather

    gpu = _on_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    candidates = GPU_DTYPES if gpu else CPU_DTYPES
    dtypes = [d for d in candidates if d in triton_gather.SUPPORTED_DTYPES]
    skipped = [DTYPE_NAMES[d] for d in candidates if d not in triton_gather.SUPPORTED_DTYPES]
    rows = [row for name in settings.projections for row in _rows(name, settings, dtypes, triton_gather, device, gpu)]
    return {
        "settings": dataclasses.asdict(settings),
        "device": torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()})",
        "gpu": gpu,
        "interpreted": triton_gather.INTERPRETED,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "tolerances": {DTYPE_NAMES[d]: {"rtol": r, "atol": a} for d, (r, a) in TOLERANCES.items() if d in dtypes},
        "skipped_dtypes": skipped,
        "rows": rows,
        "passed": all(row["passed"] for row in rows),
    }


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_report(result: dict[str, Any]) -> str:
    s = result["settings"]
    gpu = result["gpu"]
    tolerances = ", ".join(f"{name} {t['rtol']:g}/{t['atol']:g}" for name, t in result["tolerances"].items())
    lines = [
        "Triton gather-GEMMs (lightning_sft.kernels) against the torch reference",
        f"device: {result['device']}" + ("" if gpu else ", Triton interpreter (TRITON_INTERPRET=1)")
        + f"; torch {result['versions']['torch']}, triton {result['versions']['triton']}",
        f"shapes: {s['tokens']} tokens, hidden {s['hidden']}, intermediate {s['intermediate']}, k/v {s['kv']}"
        + ("" if gpu else " (small: the interpreter is slow)"),
        "check: forward output and input gradient through sparse_matmul, backend='triton' vs 'torch';"
        f" PASS iff |triton - torch| <= atol + rtol*|torch| everywhere (rtol/atol: {tolerances})",
    ]
    if result["skipped_dtypes"]:
        lines.append(f"skipped: {', '.join(result['skipped_dtypes'])} (tl.dot on bf16 is wrong under the Triton interpreter)")
    timing = "CUDA events" if gpu else f"CPU wall clock, torch threads {result['threads']}"
    alternating = "variants alternating" if gpu else "the torch variants alternating, the interpreter on its own"
    lines += [
        f"timing: {timing}; {s['warmup']} warm-up + median of {s['reps']} rounds, {alternating};"
        " the backends' product functions are called directly",
        "  triton = the Triton kernel" + ("" if gpu else f" ({INTERPRETER_NOTE})")
        + "; idx+mm = torch backend (index_select + matmul);",
        "  sliced = GEMM on a pre-made contiguous slice (the ideal); dense = the full dense GEMM;",
        "  tri/sliced = triton / sliced ms; vs dense = dense / triton ms (the speedup)"
        + ("" if gpu else "; not drawn from interpreter timings"),
    ]
    if not gpu:
        lines.append("No GPU was available, so GPU figures were not measured.")
    lines += [
        "",
        f"{'proj':<8}{'kind':<5}{'dtype':<6}{'sparsity':>8}{'k':>7}  {'product':<11}{'max err':>9}{'check':>6}"
        f"{'triton ms':>11}{'idx+mm ms':>11}{'sliced ms':>11}{'dense ms':>10}{'tri/sliced':>11}{'vs dense':>9}",
    ]
    for r in result["rows"]:
        ms = r["ms"]
        lines.append(
            f"{r['projection']:<8}{r['kind']:<5}{r['dtype']:<6}{r['sparsity']:>8g}{r['k']:>7}  {r['product']:<11}"
            f"{r['max_err']:>9.1e}{'PASS' if r['passed'] else 'FAIL':>6}{ms['triton']:>11.3f}{ms['torch']:>11.3f}"
            f"{ms['sliced']:>11.3f}{ms['dense']:>10.3f}{_ratio(r['triton_vs_sliced']):>11}{_ratio(r['speedup_vs_dense']):>9}"
        )
    failed = sum(not r["passed"] for r in result["rows"])
    total = len(result["rows"])
    lines += ["", f"all {total} checks PASS" if not failed else f"{failed} of {total} checks FAIL"]
    return "\n".join(lines)
