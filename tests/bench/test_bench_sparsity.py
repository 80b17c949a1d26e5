"""``lightning-sft bench sparsity`` on tiny sizes: it runs, reports every variant and the targets,
and its FLOP counts show the sparse variants doing less work than dense."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from lightning_sft.cli.bench import main
from lightning_sft.bench.sparsity import count_flops

TINY = [
    "--hidden", "64", "--intermediate", "128", "--layers", "4", "--heads", "4", "--kv-heads", "2",
    "--vocab", "128", "--seq", "32", "--output", "8", "--r", "4", "--rank", "2", "--warmup", "1", "--steps", "2",
]  # fmt: skip


def test_sparsity_bench_reports_every_variant_and_target(tmp_path, capsys):
    threads = torch.get_num_threads()
    path = tmp_path / "sparsity.json"
    svd_cache = tmp_path / "svd"
    assert main(["sparsity", *TINY, "--threads", "1", "--json", str(path), "--svd-cache", str(svd_cache)]) == 0
    assert any(svd_cache.iterdir())  # the factors stay for the next run
    assert torch.get_num_threads() == threads  # --threads must not leak into the caller
    out = capsys.readouterr().out
    assert "attention included" in out and "load average" in out
    for target in ("faster at the Math10K-like setting", "of the FLOP-ratio ideal", "of step time"):
        assert re.search(rf"^  .*{re.escape(target)}.*(PASS|FAIL)$", out, re.MULTILINE), out
    result = json.loads(path.read_text())
    rows = result["variants"]
    assert list(rows) == ["dense", "mlp50", "math10k", "math10k-all"]
    assert result["context_tokens"] == 32 - 8  # positions 0..22 predict unscored tokens, plus the last
    assert rows["math10k"]["mlp_sparsity"] == [0.0, 0.99, 0.99, 0.0]  # the rescaled preset keeps the ends dense
    assert rows["dense"]["flop_ratio"] == 1.0 and rows["dense"]["estimator_share"] == 0.0
    for name in ("mlp50", "math10k", "math10k-all"):
        assert 0 < rows[name]["flop_ratio"] < 1, name
        assert rows[name]["estimator_share"] > 0, name  # its selects were timed
        assert len(rows[name]["step_times_s"]) == len(rows[name]["estimator_times_s"]) == 2
    assert rows["math10k-all"]["flop_ratio"] < rows["math10k"]["flop_ratio"]


def test_sparsity_bench_rejects_unknown_variant():
    with pytest.raises(SystemExit, match="Unknown variants"):
        main(["sparsity", *TINY, "--variants", "dense,nope"])


def test_cpu_attention_flops_are_counted():
    """SDPA on CPU runs a kernel FlopCounterMode does not know; the bench counts it as torch counts
    the CUDA kernels (2 matmuls forward, 5 backward, grouped-query heads broadcast)."""
    batch, heads, kv_heads, seq, dim = 1, 4, 2, 16, 8
    q = torch.randn(batch, heads, seq, dim, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, seq, dim, requires_grad=True) for _ in range(2))

    def step() -> float:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        return 0.0

    matmul = 2 * batch * heads * seq * seq * dim
    assert count_flops(step) == (2 + 5) * matmul
