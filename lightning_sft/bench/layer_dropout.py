"""Layer dropout: step time and saved activations against the drop rate, and time-to-quality on the main job.

(a) Speed and memory, in one process on a LLaMA-shaped model with LoRA adapters (no download): for
each rate, ``steps`` training steps (forward, backward, AdamW on the adapters) with the uniform
schedule, rates interleaved step by step so machine noise hits them alike. The ideal saving of a
step is the FLOPs it skipped (the dropper's per-block count) over the dense step's FLOPs (measured
with ``FlopCounterMode``, eager attention so the counter sees it); the achieved saving is one minus
the step-time ratio to the dense steps. Saved activations are the bytes autograd keeps for backward
(``saved_tensors_hooks``), against the prediction ``dense - dropped blocks x bytes per block``.

(b) Time to quality on the main job (``lightning-sft fit``, shipped base, embedded task): training
seconds (validation excluded) until the validation loss first reaches the dense run's final value,
``rate="auto"`` against no dropout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_sft.adapters.injection import LoRAConfig, inject_lora
from lightning_sft.bench.common import build_llama, run_and_report, run_main_job
from lightning_sft.validation import int_at_least
from lightning_sft.layer_dropout.dropper import LayerDropper
from lightning_sft.layer_dropout.schedules import drop_probabilities

NAME = "layer-dropout"
HELP = "layer dropout: step time and saved activations vs the drop rate, and time to the dense run's quality"
RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
SAVING_TARGET, TIME_TARGET = 0.9, 0.8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int_at_least(8), default=512, help="(a) hidden size (default 512)")
    parser.add_argument("--layers", type=int_at_least(3), default=8, help="(a) blocks (default 8, first and last protected)")
    parser.add_argument("--seq", type=int_at_least(2), default=256, help="(a) tokens per sequence (default 256)")
    parser.add_argument("--batch", type=int_at_least(1), default=4, help="(a) sequences per step (default 4)")
    parser.add_argument("--steps", type=int_at_least(1), default=20, help="(a) timed steps per rate (default 20)")
    parser.add_argument("--fit-steps", type=int_at_least(1), default=600,
                        help="(b) optimizer steps of each main-job run (default 600, the main job's)")
    parser.add_argument("--val-every", type=int_at_least(1), default=50, help="(b) validation interval (default 50)")
    parser.add_argument("--skip-fit", action="store_true", help="run (a) only")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch intra-op threads")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lightning-sft bench layer-dropout``."""

    def measure() -> dict[str, Any]:
        start = time.perf_counter()
        result: dict[str, Any] = {"speed": speed(args.hidden, args.layers, args.seq, args.batch, args.steps)}
        if not args.skip_fit:
            result["fit"] = time_to_quality(args.fit_steps, args.val_every, args.threads)
        result.update(torch=torch.__version__, threads=args.threads or torch.get_num_threads(),
                      seconds=time.perf_counter() - start)
        return result

    return run_and_report(args.threads, args.json, measure, format_report)


# -- (a) speed and saved activations --------------------------------------------------------------------


def _saved_bytes(step: Any) -> int:
    """Bytes autograd saves for backward in ``step()`` (each storage once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def speed(hidden: int, layers: int, seq: int, batch: int, steps: int) -> dict[str, Any]:
    model = build_llama(4096, hidden, hidden * 11 // 4, layers, max(hidden // 64, 1), max(hidden // 128, 1), seq, 0)
    model.config._attn_implementation = "eager"  # so FlopCounterMode sees the attention FLOPs
    inject_lora(model, LoRAConfig(r=16, alpha=32), torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 4096, (batch, seq), generator=torch.Generator().manual_seed(0))
    skipped: list[float] = []
    dropper = LayerDropper([(f"layers.{i}", b) for i, b in enumerate(model.model.layers)], on_skip=skipped.append)
    dropper.install()

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # records the blocks' output format; warms up
    with FlopCounterMode(display=False) as counter:
        step()
    dense_flops = counter.get_total_flops()
    dense_bytes = _saved_bytes(step)
    eligible = set(range(1, layers - 1))
    dropper.dropped = eligible
    bytes_per_block = (dense_bytes - _saved_bytes(step)) / len(eligible)
    dropper.clear()

    generators = {rate: torch.Generator().manual_seed(1) for rate in RATES}
    times: dict[float, list[float]] = {rate: [] for rate in RATES}
    fractions: dict[float, list[float]] = {rate: [] for rate in RATES}
    savings: dict[float, list[float]] = {rate: [] for rate in RATES}
    memory: dict[float, list[tuple[int, int]]] = {rate: [] for rate in RATES}
    for index in range(steps + 1):  # the first round is an untimed warm-up
        for rate in RATES:
            dropper.plan_layers(drop_probabilities("uniform", rate, layers, 1, 1), generators[rate])
            skipped.clear()
            start = time.perf_counter()
            step()
            seconds = time.perf_counter() - start
            if index:
                times[rate].append(seconds)
                fractions[rate].append(len(dropper.dropped) / layers)
                savings[rate].append(sum(skipped) / dense_flops)
                if index <= 3:
                    memory[rate].append((_saved_bytes(step), len(dropper.dropped)))
            dropper.clear()
    dropper.remove()
    dense_time = statistics.fmean(times[0.0])
    rows = []
    for rate in RATES:
        achieved = 1 - statistics.fmean(times[rate]) / dense_time
        ideal = statistics.fmean(savings[rate])
        measured = statistics.fmean(b for b, _ in memory[rate])
        predicted = statistics.fmean(dense_bytes - n * bytes_per_block for _, n in memory[rate])
        rows.append({
            "rate": rate, "dropped_fraction": statistics.fmean(fractions[rate]),
            "step_time_s": statistics.fmean(times[rate]), "achieved_saving": achieved, "ideal_saving": ideal,
            "of_ideal": achieved / ideal if ideal > 0 else None,
            "saved_bytes": measured, "predicted_bytes": predicted, "bytes_ratio": measured / dense_bytes,
        })
    return {
        "model": {"hidden": hidden, "layers": layers, "seq": seq, "batch": batch, "lora_r": 16}, "steps": steps,
        "dense_flops": dense_flops, "dense_saved_bytes": dense_bytes, "bytes_per_block": bytes_per_block, "rows": rows,
        "meets_saving_target": all(r["of_ideal"] is None or r["of_ideal"] >= SAVING_TARGET for r in rows),
    }


# -- (b) time to quality on the main job -----------------------------------------------------------------


class ValidationClock(pl.Callback):
    """Writes, at every validation, the training seconds so far (validation excluded) and the val loss."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.seconds = 0.0
        self.points: list[dict[str, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.seconds += time.perf_counter() - self._start

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        self.points.append({"step": trainer.global_step, "seconds": self.seconds,
                            "val_loss": float(trainer.callback_metrics["val_loss"])})
        self.path.write_text(json.dumps(self.points))


VARIANTS: dict[str, list[str]] = {"dense": [], "auto": ["--layer-dropout", "auto"], "0.2": ["--layer-dropout", "0.2"]}


def _fit(flags: list[str], steps: int, val_every: int, root: Path, threads: int | None) -> list[dict[str, float]]:
    """One main-job run (seed 0, the main job's) with validation every ``val_every`` steps; its clock points."""
    clock = root / "clock.json"
    run_main_job([
        "--trainer.val_check_interval", str(val_every),
        "--trainer.callbacks+=lightning_sft.bench.layer_dropout.ValidationClock", "--trainer.callbacks.path", str(clock),
        *flags,
    ], 0, steps, root, threads)
    return json.loads(clock.read_text())


def time_to_quality(steps: int, val_every: int, threads: int | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lsft-layerdrop-") as tmp:
        curves = {name: _fit(flags, steps, val_every, Path(tmp) / name, threads) for name, flags in VARIANTS.items()}
    target = curves["dense"][-1]["val_loss"]
    rows = {}
    for name, points in curves.items():
        reached = next((p for p in points if p["val_loss"] <= target), None)
        rows[name] = {
            "final_val_loss": points[-1]["val_loss"], "train_seconds": points[-1]["seconds"],
            "seconds_to_target": reached["seconds"] if reached else None, "step_at_target": reached["step"] if reached else None,
            "curve": points,
        }
    dense_seconds = rows["dense"]["seconds_to_target"]
    for row in rows.values():
        row["time_ratio"] = row["seconds_to_target"] / dense_seconds if row["seconds_to_target"] is not None else None
    auto = rows["auto"]["time_ratio"]
    return {"steps": steps, "val_every": val_every, "target_val_loss": target, "variants": rows,
            "meets_time_target": auto is not None and auto <= TIME_TARGET}


# -- report ----------------------------------------------------------------------------------------------


def format_report(result: dict[str, Any]) -> str:
    speed_part = result["speed"]
    model = speed_part["model"]
    lines = [
        f"(a) LLaMA-shaped model, hidden {model['hidden']}, {model['layers']} blocks (first and last protected), LoRA r=16,"
        f" batch {model['batch']} x {model['seq']} tokens; {speed_part['steps']} steps per rate, interleaved;"
        f" torch {result['torch']}, {result['threads']} threads",
        f"{'rate':>5} {'dropped':>8} {'step s':>8} {'saving':>8} {'ideal':>8} {'of ideal':>9}"
        f" {'saved MiB':>10} {'predicted':>10} {'ratio':>6}",
    ]
    for row in speed_part["rows"]:
        of_ideal = f"{row['of_ideal']:.2f}" if row["of_ideal"] is not None else "-"
        lines.append(
            f"{row['rate']:>5.1f} {row['dropped_fraction']:>8.3f} {row['step_time_s']:>8.3f} {row['achieved_saving']:>8.3f}"
            f" {row['ideal_saving']:>8.3f} {of_ideal:>9} {row['saved_bytes'] / 2**20:>10.1f}"
            f" {row['predicted_bytes'] / 2**20:>10.1f} {row['bytes_ratio']:>6.3f}"
        )
    lines.append(f"saving >= {SAVING_TARGET:.0%} of the ideal at every rate: "
                 f"{'yes' if speed_part['meets_saving_target'] else 'no'}")
    if "fit" in result:
        fit = result["fit"]
        lines += [
            "",
            f"(b) main job, {fit['steps']} steps, validation every {fit['val_every']}; target: the dense run's final"
            f" val loss {fit['target_val_loss']:.4f}; training seconds (validation excluded)",
            f"{'variant':>8} {'final val':>10} {'train s':>8} {'s to target':>12} {'step':>6} {'vs dense':>9}",
        ]
        for name, row in fit["variants"].items():
            to_target = f"{row['seconds_to_target']:.1f}" if row["seconds_to_target"] is not None else "not reached"
            ratio = f"{row['time_ratio']:.2f}x" if row["time_ratio"] is not None else "-"
            step = str(row["step_at_target"]) if row["step_at_target"] is not None else "-"
            lines.append(f"{name:>8} {row['final_val_loss']:>10.4f} {row['train_seconds']:>8.1f} {to_target:>12}"
                         f" {step:>6} {ratio:>9}")
        lines.append(f"auto reaches the dense quality in <= {TIME_TARGET}x the time: "
                     f"{'yes' if fit['meets_time_target'] else 'no'}")
    lines.append(f"total {result['seconds'] / 60:.1f} min")
    return "\n".join(lines)
