"""Usage errors on the command line: one line on stderr naming the fix, exit status 2, no traceback.

Pure Python. A usage error is a bad argument or input the user can fix: a parser's complaint, or an
exception this package raises on purpose (a ``ValueError``, ``TypeError``, ``RuntimeError``,
``ImportError`` or ``OSError`` whose innermost frame is in ``lightning_sft``: those are the checks,
and their messages say what to change). Anything else is a bug or the environment failing and keeps
its traceback. ``LSFT_DEBUG=1`` shows the traceback of usage errors too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

DEBUG_ENV = "LSFT_DEBUG"
_OURS = (ValueError, TypeError, RuntimeError, ImportError, OSError)


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def exit_with_usage_error(prog: str, message: str, hint: str = "") -> NoReturn:
    """Print ``prog: error: message`` on one line (and the hint) and exit with status 2."""
    line = " ".join(str(message).split())
    sys.stderr.write(f"{prog}: error: {line}{f' ({hint})' if hint else ''}\n")
    raise SystemExit(2)


def usage_error_in(error: BaseException) -> BaseException | None:
    """The usage error ``error`` is, or was caused by (a parser wraps what a constructor raised); None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if is_usage_error(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def is_usage_error(error: BaseException) -> bool:
    """Raised on purpose by this package's checks (or Lightning's configuration checks)?"""
    if type(error).__name__ == "MisconfigurationException":
        return True
    if not isinstance(error, _OURS):
        return False
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and str(frame.tb_frame.f_globals.get("__name__", "")).startswith("lightning_sft.")


@contextmanager
def usage_errors(prog: str) -> Iterator[None]:
    """Turn the usage errors raised inside into one line and exit status 2."""
    try:
        yield
    except Exception as error:
        cause = None if debugging() else usage_error_in(error)
        if cause is None:
            raise
        exit_with_usage_error(prog, str(cause), f"{DEBUG_ENV}=1 shows the traceback")


class UsageParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (with where to find the options), exit 2."""

    def error(self, message: str) -> NoReturn:
        exit_with_usage_error(self.prog, message, f"{self.prog} --help lists the options")
