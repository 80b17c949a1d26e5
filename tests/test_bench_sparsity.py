"""``lightning-sft bench sparsity`` on tiny sizes: it runs, reports every variant and the targets,
and its FLOP counts show the sparse variants doing less work than dense."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lightning_sft.bench import main

TINY = [
    "--hidden", "64", "--intermediate", "128", "--layers", "4", "--heads", "4", "--kv-heads", "2",
    "--vocab", "128", "--seq", "32", "--output", "8", "--r", "4", "--rank", "2", "--warmup", "1", "--steps", "2",
]  # fmt: skip


def test_sparsity_bench_reports_every_variant_and_target(tmp_path, capsys):
    threads = torch.get_num_threads()
    path = tmp_path / "sparsity.json"
    assert main(["sparsity", *TINY, "--threads", "1", "--json", str(path)]) == 0
    assert torch.get_num_threads() == threads  # --threads must not leak into the caller
    out = capsys.readouterr().out
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
