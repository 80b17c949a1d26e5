"""One picture comparing runs at a glance (``lightning-sft report``, :mod:`lightning_sft.cli.report`).

Reads every ``metrics.csv`` (Lightning's CSVLogger) under the given directories, plots loss,
accuracy and the efficiency metrics of each run side by side into a PNG, and writes an HTML page
that embeds it together with each run's ``summary.json``.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from pathlib import Path

from lightning_sft.atomic_io import atomic_path

# (metric key, panel title, scale of the logged value); a panel is drawn when any run has the key.
PANELS = [
    ("train_loss", "train loss", 1.0),
    ("val_loss", "validation loss", 1.0),
    ("val_acc", "validation exact match", 1.0),
    ("efficiency/tokens_per_s", "tokens / s", 1.0),
    ("efficiency/step_time_s", "step time (s)", 1.0),
    ("efficiency/flops_ratio", "effective / dense FLOPs", 1.0),
    ("efficiency/effective_flops_per_step", "effective FLOPs / step", 1.0),
    ("efficiency/peak_memory_bytes", "peak memory (MiB)", 2.0**-20),
]


def run_labels(runs: dict[str, Path], summaries: dict[str, dict]) -> dict[str, str]:
    """Each run's legend label: the method its summary names, then its directory (``LoRA r=16 (version_3)``)."""
    return {key: f"{summaries[key]['method']} ({key})" if summaries.get(key, {}).get("method") else key for key in runs}


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Series ``key -> [(step, value), ...]`` from a CSVLogger file (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                if math.isfinite(number):
                    series.setdefault(key, []).append((int(float(step)), number))
    return series


def find_runs(log_dirs: list[Path]) -> dict[str, Path]:
    """Run label -> run directory, for every metrics.csv under the given directories."""
    runs: dict[str, Path] = {}
    for root in log_dirs:
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist; pass the log directory of a run (or a parent of several).")
        for csv_file in sorted(root.rglob("metrics.csv")):
            run_dir = csv_file.parent
            label = str(run_dir.relative_to(root.parent)) if run_dir != root else root.name
            runs[label] = run_dir
    if not runs:
        raise FileNotFoundError(
            f"No metrics.csv under {', '.join(map(str, log_dirs))}; runs need a CSVLogger (the CLI adds one by default)."
        )
    return runs


def plot(runs: dict[str, dict[str, list[tuple[int, float]]]], out: Path,
         tests: dict[str, tuple[float, float]] | None = None) -> None:
    """One panel per logged metric, each run a line (a single point is a marker); ``tests`` (label ->
    test exact match before and after fine-tuning) adds a panel of bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, title, scale) for key, title, scale in PANELS if any(key in series for series in runs.values())]
    if not panels:
        raise ValueError("The runs logged none of the plotted metrics: " + ", ".join(key for key, _, _ in PANELS))
    tests = tests or {}
    count = len(panels) + bool(tests)
    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for axis, (key, title, scale) in zip(axes.flat, panels):
        for label, series in runs.items():
            points = series.get(key)
            if points:
                steps, values = zip(*points)
                axis.plot(steps, [v * scale for v in values], marker="o" if len(points) < 15 else None,
                          markersize=3 if len(points) > 1 else 6, label=label)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if tests:
        axis = list(axes.flat)[len(panels)]
        for index, (label, (before, after)) in enumerate(tests.items()):
            axis.bar([index - 0.2, index + 0.2], [100 * before, 100 * after], width=0.4, color=["#bbbbbb", f"C{index}"])
        axis.set_xticks(range(len(tests)), [f"run {i + 1}" for i in range(len(tests))])
        axis.set_title("test exact match %, before (grey) / after")
        axis.grid(alpha=0.3, axis="y")
    for axis in list(axes.flat)[count:]:
        axis.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize="small")
    fig.tight_layout(rect=(0, 0.06 + 0.02 * math.ceil(len(labels) / 4), 1, 1))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_html(png: Path, summaries: dict[str, dict], out: Path) -> None:
    image = base64.b64encode(png.read_bytes()).decode()
    keys = sorted({key for summary in summaries.values() for key in summary})
    table = ""
    if summaries:
        header = "".join(f"<th>{html.escape(label)}</th>" for label in summaries)
        body = "".join(
            f"<tr><td>{html.escape(key)}</td>"
            + "".join(f"<td>{html.escape(_fmt(summary.get(key)))}</td>" for summary in summaries.values())
            + "</tr>"
            for key in keys
        )
        table = f"<h2>Run summaries</h2><table><tr><th>metric</th>{header}</tr>{body}</table>"
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>lightning-sft report</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px 8px}"
        "table{border-collapse:collapse}</style></head><body><h1>lightning-sft report</h1>"
        f"<img alt='metrics of each run' src='data:image/png;base64,{image}'>{table}</body></html>\n"
    )
    with atomic_path(out) as tmp:
        tmp.write_text(page)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
