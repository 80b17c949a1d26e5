"""``lightning-sft bench offload`` at a tiny size on CPU: the four ways agree with the plain step, offloading
lowers the device peak by what it moves to the host, and the report and the bad flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_sft.bench import offload
from lightning_sft.cli.bench import main


def test_offloading_moves_activations_off_the_device_and_changes_no_gradient(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "offload.json"
    argv = ["offload", "--hidden", "32", "--layers", "2", "--seq", "32", "--batch", "2", "--steps", "1",
            "--min-bytes", "0", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    assert "not what a GPU's side-stream copies cost" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == list(offload.WAYS)
    for way, row in rows.items():
        assert row["loss_difference"] == 0 and row["max_gradient_difference"] == 0, way
        assert (row["host_bytes"] > 0) == ("offload" in way), way
    # The step peaks where every activation is still saved: offloading takes exactly what it moved off it.
    saved = rows["plain"]["peak_bytes"] - rows["offload"]["peak_bytes"]
    assert saved == pytest.approx(rows["offload"]["host_bytes"], rel=0.05) and saved > 0
    assert rows["checkpointing+offload"]["peak_bytes"] < rows["checkpointing"]["peak_bytes"]
    assert rows["checkpointing+offload"]["host_bytes"] == 2 * 2 * 32 * 32 * 4  # one fp32 input per block
    assert rows["offload"]["baseline"] == "plain" and rows["checkpointing+offload"]["baseline"] == "checkpointing"


def test_bad_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["offload", "--min-bytes", "-1"])
    assert caught.value.code == 2 and "--min-bytes" in capsys.readouterr().err
