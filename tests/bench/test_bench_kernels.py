"""``lightning-sft bench kernels`` on tiny shapes: without a GPU it re-runs itself under the Triton
interpreter, every check passes and the table has one row per projection, dtype, sparsity and
product; a failing check gives exit code 1, and bad flags are refused up front."""

from __future__ import annotations

import json
import re

import pytest
import torch

import lightning_sft.bench.kernels as kernels
from lightning_sft.cli.bench import main

TINY = ["--hidden", "32", "--intermediate", "64", "--kv", "16", "--tokens", "16", "--sparsities", "0.5,0.9",
        "--warmup", "0", "--reps", "1", "--threads", "1"]  # fmt: skip


def test_cpu_run_checks_every_product_under_the_interpreter(tmp_path, capsys, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the command must set it for its own re-run
    if torch.cuda.is_available():
        pytest.skip("on a GPU the command runs the CUDA path in-process")
    path = tmp_path / "kernels.json"
    code = main(["kernels", *TINY, "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(path.read_text())
    assert result["interpreted"] and not result["gpu"] and result["passed"]
    assert result["skipped_dtypes"] == ["bf16"]
    assert result["settings"]["tokens"] == 16 and result["settings"]["sparsities"] == [0.5, 0.9]
    rows = result["rows"]
    expected = [(p, d, s, product) for p in kernels.PROJECTIONS for d in ("fp32", "fp16") for s in (0.5, 0.9)
                for product in ("forward", "input grad")]
    assert [(r["projection"], r["dtype"], r["sparsity"], r["product"]) for r in rows] == expected
    assert all(r["triton_vs_sliced"] is None and r["speedup_vs_dense"] is None for r in rows)
    assert {r["projection"]: r["k"] for r in rows if r["sparsity"] == 0.9} == {
        "gate_up": 6, "down": 6, "q": 3, "k_v": 1, "o": 3,
    }  # int(width * 0.1), at least 1
    table = [line for line in out.splitlines() if re.match(r"\S+ +(rows|cols) +fp", line)]
    assert len(table) == len(expected) and all(" PASS " in line for line in table), out
    assert f"all {len(expected)} checks PASS" in out
    assert kernels.INTERPRETER_NOTE in out
    assert "No GPU was available, so GPU figures were not measured." in out


def test_a_failing_check_exits_1(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as in the re-run: no further subprocess
    result = {"passed": False}
    monkeypatch.setattr(kernels, "benchmark", lambda settings: result)
    monkeypatch.setattr(kernels, "format_report", lambda r: "1 of 1 checks FAIL")
    assert main(["kernels", *TINY]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sparsities", "1.5"], r"argument --sparsities: each sparsity .* must be in \[0, 1\); got '1.5'"),
        (["--sparsities", "0.5,x"], r"argument --sparsities: must be comma-separated numbers"),
        (["--projections", "gate_up,mlp"], r"argument --projections: unknown projection \['mlp'\]"),
        (["--reps", "0"], r"argument --reps: must be an integer >= 1; got 0"),
    ],
)
def test_bad_flags_are_refused(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["kernels", *flags])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
