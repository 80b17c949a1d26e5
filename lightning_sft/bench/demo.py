"""``lightning-sft bench demo``: the main job exactly as the README runs it, timed, and its figures
written into docs/demo.md, so the page quotes a run instead of typed numbers.

Runs ``lightning-sft fit`` in a fresh process (with ``--trainer.default_root_dir`` and no progress bar,
which change nothing else; words after ``--`` are added to its command line), then renders the run's
``summary.json``, its validation exact-match curve (``metrics.csv``) and the wall clock into the
markdown block between docs/demo.md's ``main job results`` markers (``--write-docs``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from textwrap import fill
from typing import Any

from lightning_sft.atomic_io import atomic_path
from lightning_sft.report import read_metrics
from lightning_sft.summary import format_summary

NAME = "demo"
HELP = "the main job (`lightning-sft fit`) as the README runs it; --write-docs puts its figures into docs/demo.md"
BLOCK = "main job results"
COMMAND = "lightning-sft bench demo --write-docs docs/demo.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=None, help="where the run writes (default: a new temp directory)")
    parser.add_argument("--write-docs", type=Path, default=None, metavar="DEMO_MD",
                        help="rewrite the block between this file's 'main job results' markers")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    parser.add_argument("fit_args", nargs=argparse.REMAINDER, help="after --: more `lightning-sft fit` flags")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``lightning-sft bench demo``."""
    extra = args.fit_args[1:] if args.fit_args[:1] == ["--"] else args.fit_args
    root = args.root or Path(tempfile.mkdtemp(prefix="lsft-demo-"))
    result = measure(root, extra)
    block = render(result)
    print(block)
    if args.write_docs is not None:
        write_block(args.write_docs, block)
        print(f"wrote the '{BLOCK}' block of {args.write_docs}")
    if args.json is not None:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def measure(root: Path, extra: list[str]) -> dict[str, Any]:
    """Run the main job under ``root`` and collect its summary, validation curve and wall clock."""
    flags = ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra]
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lightning_sft.cli", "fit", *flags], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"lightning-sft fit {' '.join(flags)} failed:\n{done.stderr[-3000:]}")
    (summary_path,) = root.rglob("summary.json")
    summary = json.loads(summary_path.read_text())
    curve = read_metrics(summary_path.parent / "metrics.csv").get("val_acc", [])
    return {"flags": flags, "summary": summary, "val_acc": curve, "wall_s": wall, "cores": os.cpu_count()}


def render(result: dict[str, Any]) -> str:
    """The markdown of docs/demo.md's results block: how it was measured, the summary, what it says."""
    summary = dict(result["summary"])
    for key in ("adapter", "diff"):  # files of the run's own directory, shown under ROOT
        if summary.get(key) and "/lightning_logs/" in summary[key]:
            summary[key] = "ROOT/lightning_logs/" + summary[key].split("/lightning_logs/", 1)[1]
    minutes, seconds = divmod(result["wall_s"], 60)
    ran = " ".join(["lightning-sft fit", *result["flags"][4:]])
    curve = ", ".join(f"{acc:.1%} (step {step})" for step, acc in result["val_acc"])
    lines = [
        fill(f"Measured by `{COMMAND}` on a {result['cores']}-core CPU machine: it runs `{ran}` with"
             " `--trainer.default_root_dir ROOT --trainer.enable_progress_bar false` (which change nothing else) and"
             " writes this block.", width=100, break_on_hyphens=False),
        "",
        "```",
        format_summary(summary),
        f"real\t{int(minutes)}m{seconds:.1f}s",
        "```",
        "",
    ]
    if curve:
        lines += [fill(f"Validation exact match during the run: {curve} (`lightning-sft report ROOT/lightning_logs`"
                       " draws the curves).", width=100, break_on_hyphens=False), ""]
    if summary.get("test_acc_before") is not None and summary.get("test_acc_after") is not None:
        lines.append(fill(
            f"What this says: the base, which never saw the question format, goes from {summary['test_acc_before']:.1%}"
            f" to {summary['test_acc_after']:.1%} exact match on held-out questions in {summary['steps']} LoRA steps"
            f" ({result['wall_s'] / 60:.1f} minutes in all), and the test loss falls from"
            f" {summary['test_loss_before']:.2f} to {summary['test_loss_after']:.2f}.", width=100, break_on_hyphens=False
        ))
    return "\n".join(lines)


def write_block(path: Path, block: str) -> None:
    """Replace what stands between ``path``'s results markers by ``block`` (the rest of the file unchanged)."""
    text = path.read_text()
    pattern = re.compile(rf"(<!-- {BLOCK}: generated by [^>]*-->\n).*?(\n<!-- end of {BLOCK} -->)", re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{path} has no '<!-- {BLOCK}: generated by ... -->' ... '<!-- end of {BLOCK} -->' markers.")
    with atomic_path(path) as tmp:
        tmp.write_text(pattern.sub(lambda m: m.group(1) + block + m.group(2), text, count=1))
