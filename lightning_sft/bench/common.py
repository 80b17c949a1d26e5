"""What every benchmark command shares: the LLaMA-shaped test model and the run/report wrapper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sft.atomic_io import atomic_path


def build_llama(
    vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, seq: int, seed: int
) -> nn.Module:
    """A random-init ``LlamaForCausalLM`` of the given sizes, fp32, in training mode (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seq,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32).train()


def run_and_report(
    threads: int | None, json_path: str | None, measure: Callable[[], dict[str, Any]], report: Callable[[dict], str]
) -> int:
    """Run ``measure`` with ``threads`` torch threads (restored afterwards), print, optionally save JSON."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = measure()
    finally:
        torch.set_num_threads(previous_threads)
    print(report(result))
    if json_path is not None:
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run_main_job(flags: list[str], seed: int, steps: int, root: Path, threads: int | None) -> None:
    """One run of the main job (``lightning-sft fit``) for ``steps`` steps in a fresh process, writing under
    ``root``; ``flags`` are added to its command line. Raises with the run's stderr if it fails."""
    command = [
        sys.executable, "-m", "lightning_sft.cli", "fit", "--seed_everything", str(seed),
        "--trainer.max_steps", str(steps), "--model.decay_steps", str(steps), "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", *flags,
    ]
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def main_job_summary(flags: list[str], seed: int, steps: int, root: Path, threads: int | None) -> dict[str, Any]:
    """``run_main_job``, then the summary.json the run wrote."""
    run_main_job(flags, seed, steps, root, threads)
    (path,) = root.rglob("summary.json")
    return json.loads(path.read_text())
