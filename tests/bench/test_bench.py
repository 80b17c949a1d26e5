"""The benchmark CLI on tiny sizes, and the timing helpers it rests on."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from lightning_sft.cli.bench import main
from lightning_sft.bench.timing import interleaved, paired_ratios, summarize, time_call

TINY = [
    "--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "4", "--kv-heads", "2",
    "--vocab", "128", "--seq", "16", "--batch", "2", "--r", "4", "--warmup", "1", "--steps", "3",
]  # fmt: skip


def test_lora_bench_prints_and_writes_ratio(tmp_path, capsys):
    pytest.importorskip("peft")
    threads = torch.get_num_threads()
    path = tmp_path / "lora.json"
    assert main(["lora", *TINY, "--threads", "1", "--json", str(path)]) == 0
    assert torch.get_num_threads() == threads  # --threads must not leak into the caller
    out = capsys.readouterr().out
    match = re.search(r"^ours/peft step time: (\d+\.\d+)x \(target <= 1\.0x\)$", out, re.MULTILINE)
    assert match, out
    result = json.loads(path.read_text())
    assert result["ratio_ours_over_peft"] > 0
    assert float(match[1]) == pytest.approx(result["ratio_ours_over_peft"], abs=0.005)
    assert result["threads"] == 1
    ours, theirs = result["variants"]["ours"], result["variants"]["peft"]
    # r * (in + out) over q, k, v, o (32->32, 32->16 twice, 32->32) and gate, up, down (32<->64).
    assert ours["trainable_params"] == theirs["trainable_params"] == 4 * (64 + 48 + 48 + 64 + 3 * 96)
    assert len(ours["step_times_s"]) == len(theirs["step_times_s"]) == 3
    assert result["first_step_loss_abs_diff"] <= 1e-5


def test_lora_bench_without_peft_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    assert main(["lora", *TINY]) == 1
    assert "pip install peft" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["no-such-benchmark"], ["lora", "--steps", "0"], ["lora", "--warmup", "-1"]])
def test_bad_command_lines_are_usage_errors(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_interleaved_warms_up_then_alternates():
    calls: list[str] = []
    variants = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = interleaved(variants, steps=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert {name: len(samples) for name, samples in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for samples in times.values() for t in samples)
    with pytest.raises(ValueError):
        interleaved(variants, steps=0)


def test_time_call_syncs_around_the_call():
    events: list[str] = []
    elapsed = time_call(lambda: events.append("call"), sync=lambda: events.append("sync"))
    assert events == ["sync", "call", "sync"]
    assert elapsed >= 0


def test_summarize_median_and_iqr():
    summary = summarize([5.0, 1.0, 4.0, 2.0, 3.0, 100.0, 3.0])
    assert summary.median == 3.0
    assert (summary.q1, summary.q3) == (2.5, 4.5)
    assert summary.iqr == 2.0
    assert summary.n == 7
    assert summarize([0.5]).iqr == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_paired_ratios():
    assert paired_ratios([2.0, 3.0], [1.0, 6.0]) == [2.0, 0.5]
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])
