"""``lightning-sft``: one module per subcommand, and the registry they are listed in.

``fit`` / ``validate`` / ``test`` are Lightning's CLI with this package's callbacks as flags
(:mod:`lightning_sft.cli.train`); every other subcommand is a module with ``build_parser()`` and
``main(argv) -> int``, imported only when it runs. ``--help``, its epilog and docs/cli.md's command list come from
:data:`COMMANDS`. See ``docs/cli.md``.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

from lightning_sft.usage import exit_with_usage_error, usage_errors


@dataclass(frozen=True)
class Command:
    """One ``lightning-sft`` subcommand: ``module`` provides ``build_parser()`` (its options, parsed without
    running: docs' quoted commands are checked with it) and ``main(argv) -> int``, and is imported only when
    the command runs (None: one of LightningCLI's own); ``usage`` and ``does`` are what --help and
    docs/cli.md show."""

    name: str
    module: str | None
    usage: str
    does: str


# Every subcommand, in the order --help and docs/cli.md list them: the one registry of the command line.
COMMANDS: tuple[Command, ...] = (
    Command("fit", None, "fit ...", "`Trainer.fit`, then saves the LoRA adapter or the sparse diff and tests again"),
    Command("validate", None, "validate ...", "`Trainer.validate` (one pass over the validation split)"),
    Command("test", None, "test ...", "`Trainer.test` (one pass over the test split)"),
    Command("bench", "lightning_sft.cli.bench", "bench BENCHMARK ...",
            "micro-benchmarks, `lightning_sft.bench`; `lightning-sft bench --help` lists them"),
    Command("diff", "lightning_sft.cli.diff", "diff inspect|apply|revert DIFF ...",
            "what a sparse diff holds (`inspect`), or a model directory with it added (`apply`) or taken out (`revert`)"
            " written to a new directory ([sparse_finetuning.md](sparse_finetuning.md))"),
    Command("federated", "lightning_sft.cli.federated", "federated [--clients 4] [--rounds 5] ...",
            "a Flower simulation of federated LoRA on a non-IID split of the embedded task ([federated.md](federated.md))"),
    Command("plan", "lightning_sft.cli.plan", "plan --model CONFIG_OR_PRESET --gpu-mem 24GB ...",
            "the fine-tuning recipes that fit a GPU budget, and the recommended one as a `fit` command"
            " ([memory.md](memory.md), [distributed.md](distributed.md))"),
    Command("pretrain", "lightning_sft.cli.pretrain", "pretrain --out DIR ...",
            "reproduce the shipped base model ([base_model.md](base_model.md))"),
    Command("report", "lightning_sft.cli.report", "report LOGDIR [LOGDIR ...] [--out DIR]",
            "loss, accuracy and efficiency curves of the runs under the directories, in `report.png` + `report.html`"),
)
PLAIN_SUBCOMMANDS = {command.name: command.module for command in COMMANDS if command.module is not None}


def command_table() -> str:
    """The command list of docs/cli.md, from ``COMMANDS``."""
    rows = [f"| `lightning-sft {c.usage.replace('|', chr(92) + '|')}` | {c.does} |" for c in COMMANDS]
    return "\n".join(["| command | what it does |", "| --- | --- |", *rows])


def commands_epilog() -> str:
    return "Commands: " + "; ".join(f"{c.name}: {c.does.split(' ([')[0]}" for c in COMMANDS) + "."


def top_help() -> str:
    """``lightning-sft --help``: every command of ``COMMANDS`` (Lightning's own help would list only the
    three it runs), and what fit / validate / test take."""
    from lightning_sft.cli.flags import flag_summary  # loads the callbacks (Lightning): only for --help

    width = max(len(c.name) for c in COMMANDS)
    lines = ["usage: lightning-sft [-c CONFIG] COMMAND ...", "",
             "Fine-tune LLMs cheaply with Lightning. `lightning-sft COMMAND --help` shows a command's options.", "",
             "commands:"]
    lines += [textwrap.fill(c.does.split(" ([")[0], width=100, initial_indent=f"  {c.name:<{width}}  ",
                            subsequent_indent=" " * (width + 4), break_on_hyphens=False) for c in COMMANDS]
    lines += ["", textwrap.fill(
        f"fit, validate and test take the Trainer, --model and --data options plus {flag_summary()}; -c/--config"
        " reads them from a YAML file. LoRA and EfficiencyMonitor are on by default. See docs/cli.md.", width=100,
        break_on_hyphens=False)]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """Console entry: ``lightning-sft {fit,validate,test,bench,diff,federated,plan,pretrain,report} ...``.

    Usage errors (a bad flag or value, a check of ours refusing the input) print one line and exit with
    status 2; ``LSFT_DEBUG=1`` shows their traceback (see ``lightning_sft.usage``).
    """
    argv = sys.argv[1:] if args is None else args
    prog = "lightning-sft" + (f" {argv[0]}" if argv[:1] and not argv[0].startswith("-") else "")
    with usage_errors(prog):
        if argv in ([], ["-h"], ["--help"]):
            if not argv:
                names = ", ".join(c.name for c in COMMANDS)
                exit_with_usage_error(prog, f"choose a command: {names}", "lightning-sft --help says what each does")
            print(top_help())
            return
        if argv[:1] and argv[0] in PLAIN_SUBCOMMANDS:
            module = importlib.import_module(PLAIN_SUBCOMMANDS[argv[0]])  # lazy: training needs none of them
            code = module.main(argv[1:])
            if code:
                raise SystemExit(code)
            return
        from lightning_sft.cli.train import SFTCLI  # Lightning loads only for fit / validate / test

        SFTCLI(args=args)


# The training CLI's names, loaded on first use so the plain subcommands start without Lightning.
_TRAIN_EXPORTS = {"SFTCLI": "lightning_sft.cli.train", "FeatureFlag": "lightning_sft.cli.flags",
                  "FEATURE_FLAGS": "lightning_sft.cli.flags", "DEFAULT_CALLBACKS": "lightning_sft.cli.flags"}


def __getattr__(name: str) -> Any:
    if name in _TRAIN_EXPORTS:
        return getattr(importlib.import_module(_TRAIN_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

