"""``lightning-sft bench offload``: a training step with and without activation offloading, alone and with
gradient checkpointing.

A random-init LLaMA-shaped model (LoRA r=16 on every block linear) runs forward and backward on one batch in
four ways: plain, offloading (``recipes.offload``), checkpointing, and both. Per way: the device peak, the host
memory the offloaded activations took, agreement with the plain step (loss and LoRA gradients), and the step
time as paired ratios of interleaved rounds against the plain step (or checkpointing alone, for both).

On CUDA the copies go to pinned memory on a side stream (``StreamTransfer``) and the peak is the allocator's.
On a CPU there is no second memory: the copies stay in CPU memory (``CopyTransfer``), ``LiveTensors`` counts
them apart as host memory, and the step times measure the copies' cost with nothing to overlap them with.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lightning_sft.bench.common import build_llama, run_and_report
from lightning_sft.bench.timing import interleaved, paired_ratios
from lightning_sft.validation import int_at_least

if TYPE_CHECKING:
    from lightning_sft.memory.tracker import HostCopies

NAME = "offload"
HELP = "a training step with activation offloading (and checkpointing) against without: device peak, host memory, step time"
WAYS = ("plain", "offload", "checkpointing", "checkpointing+offload")
_BASELINE = {"offload": "plain", "checkpointing": "plain", "checkpointing+offload": "checkpointing"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int_at_least(8), default=256, help="hidden size (default 256)")
    parser.add_argument("--layers", type=int_at_least(2), default=4, help="blocks (default 4)")
    parser.add_argument("--seq", type=int_at_least(2), default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--batch", type=int_at_least(1), default=4, help="sequences (default 4)")
    parser.add_argument("--steps", type=int_at_least(1), default=5, help="timed rounds (default 5)")
    parser.add_argument("--min-bytes", type=int_at_least(0), default=2**16,
                        help="saved tensors of this many bytes and more move (default 65536; the callback's is 1 MiB)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lightning-sft bench offload``."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lightning-sft bench offload: error: --device cuda needs a CUDA GPU; use --device cpu")
    return run_and_report(
        args.threads, args.json,
        lambda: measure(args.hidden, args.layers, args.seq, args.batch, args.steps, args.min_bytes, device), format_report,
    )


def measure(hidden: int, layers: int, seq: int, batch: int, steps: int, min_bytes: int, device: str) -> dict[str, Any]:
    """Peaks, host memory, agreement and paired step-time ratios of the four ways, fp32 (CPU) or bf16 (CUDA)."""
    from lightning_sft.adapters import LoRAConfig, inject_lora
    from lightning_sft.recipes.checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
    from lightning_sft.memory.tracker import HostCopies
    from lightning_sft.recipes.offload import offload_activations

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_llama(2048, hidden, 3 * hidden, layers, 4, 2, seq, seed=0)
    inject_lora(model, LoRAConfig(r=16), torch.Generator().manual_seed(0))
    model.to(device=device, dtype=dtype)
    ids = torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    transfer = HostCopies() if device == "cpu" else None

    def step(way: str) -> tuple[float, list[torch.Tensor], int]:
        checkpointed = "checkpointing" in way and bool(enable_gradient_checkpointing(model))
        offloaded = offload_activations(model, device, transfer, min_bytes) if "offload" in way else None
        try:
            loss = model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, trained)
        finally:
            if offloaded is not None:
                offloaded.remove()
            if checkpointed:
                disable_gradient_checkpointing(model)
        return float(loss.detach()), list(grads), offloaded.offloader.host_peak if offloaded is not None else 0

    results = {way: _peak(device, transfer, lambda way=way: step(way)) for way in WAYS}
    sync = torch.cuda.synchronize if device == "cuda" else None
    times = interleaved({way: lambda way=way: step(way) for way in WAYS}, steps, warmup=1, sync=sync)
    plain_loss, plain_grads = results["plain"][0][:2]
    rows = {}
    for way, ((loss, grads, host), peak) in results.items():
        row = {"peak_bytes": peak, "host_bytes": host, "loss_difference": abs(loss - plain_loss),
               "max_gradient_difference": max(float((a - b).abs().max()) for a, b in zip(grads, plain_grads))}
        if way in _BASELINE:
            ratios = paired_ratios(times[way], times[_BASELINE[way]])
            row.update(time_ratio_median=statistics.median(ratios), time_ratios=ratios, baseline=_BASELINE[way])
        rows[way] = row
    return {"device": device, "dtype": str(dtype).removeprefix("torch."), "hidden": hidden, "layers": layers,
            "seq": seq, "batch": batch, "min_bytes": min_bytes, "rows": rows}


def _peak(device: str, transfer: HostCopies | None, step: Callable[[], Any]) -> tuple[Any, int]:
    """``step()``'s result and the device peak while it ran (above what was allocated before)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = step()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    from lightning_sft.memory.tracker import LiveTensors

    assert transfer is not None
    with LiveTensors() as tracker:
        transfer.tracker = tracker
        try:
            result = step()
        finally:
            transfer.tracker = None
    return result, tracker.peak


def format_report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [
        f"LLaMA-shaped, hidden {result['hidden']}, {result['layers']} blocks, {result['batch']} x {result['seq']} tokens,"
        f" LoRA r=16, {result['dtype']}, {result['device'].upper()}; offloading saved tensors of"
        f" {result['min_bytes']:,} bytes and more; one forward + backward:",
        "",
        "| way | device peak MiB | host MiB | loss diff | max LoRA grad diff | step time ratio (vs) |",
        "|---|---|---|---|---|---|",
    ]
    for way, row in rows.items():
        ratio = f"{row['time_ratio_median']:.3f} ({row['baseline']})" if "baseline" in row else "-"
        lines.append(f"| {way} | {row['peak_bytes'] / 2**20:.1f} | {row['host_bytes'] / 2**20:.1f} |"
                     f" {row['loss_difference']:.1e} | {row['max_gradient_difference']:.1e} | {ratio} |")
    plain, off = rows["plain"]["peak_bytes"], rows["offload"]["peak_bytes"]
    ckpt, both = rows["checkpointing"]["peak_bytes"], rows["checkpointing+offload"]["peak_bytes"]
    lines += ["", f"Offloading: device peak {off / plain - 1:+.1%} alone, {both / ckpt - 1:+.1%} with checkpointing."]
    if result["device"] == "cpu":
        lines.append("On a CPU the copies stay in CPU memory and have no compute to overlap: the time ratios are their"
                     " cost, not what a GPU's side-stream copies cost.")
    return "\n".join(lines)
