"""``lightning-sft report LOGDIR [LOGDIR ...]``: one picture comparing runs at a glance."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_sft.report import find_runs, plot, read_metrics, run_labels, write_html
from lightning_sft.usage import UsageParser


def build_parser() -> UsageParser:
    parser = UsageParser(prog="lightning-sft report", description=__doc__.splitlines()[0].split(': ', 1)[1])
    parser.add_argument("log_dirs", nargs="+", type=Path, help="run directories or parents of several runs")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the first LOGDIR)")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.log_dirs)
        out_dir = args.out or args.log_dirs[0]
        png, page = out_dir / "report.png", out_dir / "report.html"
        summaries = {
            key: json.loads((path / "summary.json").read_text()) for key, path in runs.items()
            if (path / "summary.json").is_file()
        }
        labels = run_labels(runs, summaries)
        tests = {labels[key]: (s["test_acc_before"], s["test_acc_after"]) for key, s in summaries.items()
                 if s.get("test_acc_before") is not None and s.get("test_acc_after") is not None}
        plot({labels[key]: read_metrics(path / "metrics.csv") for key, path in runs.items()}, png, tests)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    write_html(png, {labels[key]: summary for key, summary in summaries.items()}, page)
    print(f"wrote {png} and {page} ({len(runs)} run{'s' if len(runs) != 1 else ''})")
    return 0
