"""Running a 2-process CPU (gloo) DDP script and checking that both ranks end with the same adapters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# tests/helpers: the scripts the tests launch in fresh processes live beside this module.
HELPERS = Path(__file__).resolve().parent


def run_ddp_and_compare_adapters(
    script: Path, out: Path, expected_tensors: int, trained_suffix: str = "lora_B"
) -> dict[str, torch.Tensor]:
    """Run ``script OUT`` (it writes OUT/rank{N}.safetensors) and assert the ranks agree bit for bit
    and that training moved the tensors named ``*trained_suffix`` (zero at the start); returns rank 0's tensors."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) == expected_tensors
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    assert any(name.endswith(trained_suffix) and rank0[name].abs().sum() > 0 for name in rank0)
    return rank0
