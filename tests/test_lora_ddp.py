"""LoRA under 2-process DDP on CPU (gloo): trains, and both ranks end with identical adapters."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def test_two_process_ddp_trains_identical_adapters(tmp_path: Path) -> None:
    script = Path(__file__).parent / "ddp_lora_script.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) == 28
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    assert any(name.endswith("lora_B") and rank0[name].abs().sum() > 0 for name in rank0)
