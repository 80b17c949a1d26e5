"""LoRA under 2-process DDP on CPU (gloo): trains, and both ranks end with identical adapters."""

from pathlib import Path

from ddp_helpers import HELPERS, run_ddp_and_compare_adapters


def test_two_process_ddp_trains_identical_adapters(tmp_path: Path) -> None:
    run_ddp_and_compare_adapters(HELPERS / "ddp_lora_script.py", tmp_path, expected_tensors=28)
