"""``lightning-sft bench distributed``: the FSDP2 run and the one-process run agree step by step, and the
per-rank bytes match the memory model's ZeRO-3 estimate (a short run; the docs quote the default one)."""

from __future__ import annotations

from lightning_sft.bench import distributed


def test_fsdp2_and_one_process_curves_and_per_rank_bytes() -> None:
    result = distributed.measure(steps=2, batch=2)
    assert len(result["fsdp2_losses"]) == len(result["one_process_losses"]) == 2
    assert result["max_relative_loss_difference"] <= 1e-5
    assert result["fsdp2_losses"][1] != result["fsdp2_losses"][0]  # it trained
    assert len(result["ranks"]) == 2
    for rank in result["ranks"]:
        assert abs(rank["parameters_error"]) <= distributed.TARGET and abs(rank["optimizer_error"]) <= distributed.TARGET
        assert rank["parameters"] > 0 and rank["optimizer"] > 0
    text = distributed.report(result)
    assert "largest relative loss difference over 2 steps" in text and "(target <= 5%): met" in text

