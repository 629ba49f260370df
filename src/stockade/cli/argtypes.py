"""Argument types shared by commands: bounded, with an error that names the accepted range."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stockade.errors import UsageError

MAX_COUNT = 100_000


def count(text: str) -> int:
    """A number of items to list: 1 to 100000."""
    if not (text.isascii() and text.isdigit() and len(text) <= 6) \
            or not 1 <= int(text) <= MAX_COUNT:
        raise argparse.ArgumentTypeError(
            f"{text[:20]!r} is not a count; give a whole number from 1 to {MAX_COUNT}")
    return int(text)


def check_job_arg(id_or_prefix: str) -> str:
    """A job id or prefix as typed: 1 to 64 letters and digits (UsageError otherwise)."""
    from stockade.errors import UsageError

    if not (0 < len(id_or_prefix) <= 64 and id_or_prefix.isascii() and id_or_prefix.isalnum()):
        raise UsageError(f"{id_or_prefix[:40]!r}{'...' if len(id_or_prefix) > 40 else ''} is "
                         "not a job id", hint="list jobs with: stockade jobs")
    return id_or_prefix


def ambiguous(id_or_prefix: str, matches: list[str]) -> UsageError:
    """The error for a prefix of several job ids (``matches``: up to four of them)."""
    from stockade.errors import UsageError

    more = ", ..." if len(matches) > 3 else ""
    return UsageError(f"{id_or_prefix!r} is the start of several job ids: "
                      f"{', '.join(matches[:3])}{more}",
                      hint="give more of the id (stockade jobs lists them)")
