"""The planner's sharded recipe, pasted into ``lightning-sft fit``, runs on CPU with FSDP2 and 2 processes
for the shipped base, and writes one adapter and a true summary."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from lightning_sft import load_adapter, lora_layers
from lightning_sft.cli import plan as plan_cli
from lightning_sft.modules.causal_lm import build_model


def test_the_planned_fsdp2_command_runs_on_two_cpu_processes(tmp_path: Path, capsys) -> None:
    assert plan_cli.main(["--model", "sft-llama-5m", "--gpu-mem", "8GB", "--gpus", "2", "--seq", "256",
                          "--batch", "32", "--sharded", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    command = shlex.split(planned["recommended_command"])
    assert command[:2] == ["lightning-sft", "fit"]
    assert "--trainer.strategy fsdp2 --trainer.devices 2" in planned["recommended_command"]
    assert "--model.model sft-llama-5m" in planned["recommended_command"]
    # On this machine: CPU instead of the planned GPUs, and a few steps on a little data.
    extra = ["--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--model.decay_steps", "2",
             "--model.warmup_steps", "0", "--trainer.val_check_interval", "2", "--data.num_train", "128",
             "--data.num_val", "16", "--data.num_test", "16", "--data.batch_size", "8",
             "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "lightning_sft.cli", *command[1:], *extra], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (version,) = (tmp_path / "lightning_logs").iterdir()
    summary = json.loads((version / "summary.json").read_text())
    assert summary["steps"] == 2
    assert sorted(p.name for p in (version / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = build_model("sft-llama-5m").to(torch.bfloat16)  # the planned precision, bf16-true, trained this base
    load_adapter(base, version / "adapter")  # verifies the base fingerprint the sharded run wrote
    assert len(lora_layers(base)) == 42
    assert any(layer.lora_B.abs().sum() > 0 for layer in lora_layers(base).values())
