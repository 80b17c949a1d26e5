"""``lightning-sft bench recall`` on one small batch: it runs on the shipped base, reports every
layer and part, and writes a consistent JSON."""

from __future__ import annotations

import json
import re

import pytest

from lightning_sft.cli.bench import main


def test_recall_bench_reports_every_layer_and_the_target(tmp_path, capsys):
    path = tmp_path / "recall.json"
    assert main(["recall", "--ranks", "8,2", "--batches", "1", "--calibration-batches", "2", "--batch-size", "4",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^svd8-cal MLP recall >= 0.85 on every layer: (PASS|FAIL) \(min 0\.\d{3} at layer \d\)$",
                     out, re.MULTILINE), out
    result = json.loads(path.read_text())
    assert result["strategies"] == ["svd2", "svd8", "svd2-cal", "svd8-cal", "norm", "random"]  # ranks sorted
    assert result["calibration_batches"] == 2 and result["calibration_tokens"] > 0
    assert result["kept"] == {"mlp": 352, "qk": 64, "v": 64}  # 704 MLP and 128 kv channels at 0.5
    assert result["batches"] == 1 and 0 < result["context_tokens"] < result["tokens"]
    assert len(result["per_layer"]) == 6
    for row in [*result["per_layer"], result["mean"]]:
        for part in ("mlp", "qk", "v"):
            assert all(0.0 <= value <= 1.0 for value in row[part].values()), row
    mlp8 = [row["mlp"]["svd8-cal"] for row in result["per_layer"]]
    assert result["target"]["min"] == min(mlp8) and result["target"]["layer"] == mlp8.index(min(mlp8))
    assert result["target"]["pass"] == (min(mlp8) >= 0.85)
    # The estimators carry signal: rank-8 SVD beats a random choice on average, and calibration helps.
    assert result["mean"]["mlp"]["svd8"] > result["mean"]["mlp"]["random"] + 0.1
    assert result["mean"]["mlp"]["svd8-cal"] > result["mean"]["mlp"]["svd8"]


@pytest.mark.parametrize("flags", [["--sparsity", "1.0"], ["--ranks", "0"], ["--ranks", "a"], ["--batches", "0"],
                                   ["--calibration-batches", "0"]])
def test_recall_bench_rejects_bad_options(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["recall", *flags])
    assert exit_info.value.code == 2
