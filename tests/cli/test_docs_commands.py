"""Every ``lightning-sft`` command quoted in a code block of README.md or docs/ still parses: its subcommand
exists and takes every flag and value as written (parsed, not run: fit/validate/test stop before anything
is instantiated, the other commands go through their ``build_parser()``)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from lightning_sft.cli import PLAIN_SUBCOMMANDS
from lightning_sft.cli.train import SFTCLI

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_PREFIXES = (["lightning-sft"], ["python", "-m", "lightning_sft.cli"], ["python3", "-m", "lightning_sft.cli"])
_SHELL_ENDS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def _commands(block: str) -> list[list[str]]:
    """The ``lightning-sft`` invocations of a shell block, as argv after the program name."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        while words:
            prefix = next((p for p in _PREFIXES if words[: len(p)] == p), None)
            if prefix is None:
                words = words[1:]
                continue
            words = words[len(prefix):]
            end = next((i for i, word in enumerate(words) if word in _SHELL_ENDS), len(words))
            found.append(words[:end])
            words = words[end:]
    return found


def _quoted() -> list[tuple[str, list[str]]]:
    return [(f"{page.name}: {' '.join(argv)}", argv) for page in PAGES
            for block in _code_blocks(page.read_text()) for argv in _commands(block)]


QUOTED = _quoted()


class _Parsed(Exception):
    pass


class _ParseOnly(SFTCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed


def test_the_docs_quote_commands_of_every_kind() -> None:
    subcommands = {argv[0] for _, argv in QUOTED if argv}
    assert {"fit", "plan", "bench", "diff", "federated", "report"} <= subcommands, subcommands


@pytest.mark.parametrize(("where", "argv"), QUOTED, ids=[where for where, _ in QUOTED])
def test_a_quoted_command_parses(where: str, argv: list[str], tmp_path: Path) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        return  # the program's own help
    # A config file the page writes in an earlier step (`--print_config > fit.yaml`) is read while parsing:
    # an empty one stands in for it, so the rest of the command is still checked.
    for i, word in enumerate(argv):
        if word.endswith((".yaml", ".yml")) and not Path(word).exists():
            (tmp_path / Path(word).name).write_text("{}\n")
            argv = [*argv[:i], str(tmp_path / Path(word).name), *argv[i + 1:]]
    if argv[0] in PLAIN_SUBCOMMANDS:
        parser = importlib.import_module(PLAIN_SUBCOMMANDS[argv[0]]).build_parser()
        try:
            parser.parse_args(argv[1:])
        except SystemExit as stopped:
            assert stopped.code == 0, where  # --help exits 0; a parse error exits 2
        return
    with pytest.raises((_Parsed, SystemExit)) as stopped:
        _ParseOnly(args=argv)
    if stopped.type is SystemExit:
        assert stopped.value.code == 0, where
