"""Bounded, printable problem reports: how a hostile spec is echoed back to a person.

A spec is written by whoever opened the pull request, so anything taken from it (a value, a
key, a path) is shown only as a short excerpt with control characters escaped, each problem
line is cut to :data:`MAX_LINE` characters, and at most :data:`MAX_PROBLEMS` problems are
listed. However large or strange the input, the error text stays a few kilobytes.
"""

from __future__ import annotations

import reprlib
from typing import Any

from stockade.errors import SpecError

MAX_PROBLEMS = 20
MAX_LINE = 300
EXCERPT = 60

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple = 2, 4, 4, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = EXCERPT, EXCERPT, 40


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """A short, printable ``repr`` of ``value``: never long, never a control character."""
    if isinstance(value, str):
        text = repr(value[:limit]) + (f"... ({len(value)} characters)"
                                      if len(value) > limit else "")
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        text = f"a {value.bit_length()}-bit integer"
    else:
        text = _repr.repr(value)
    return printable(text)[: limit * 2]


def printable(text: str) -> str:
    """``text`` with every control or format character (C0, C1, DEL, bidi...) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else _escape(c) for c in text)


def _escape(c: str) -> str:
    import unicodedata  # (only for text that is not printable: not at start-up)

    if unicodedata.category(c) == "Zs":
        return " "
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


def spec_error(source: str, problems: list[str], more: int = 0) -> SpecError:
    """A :class:`SpecError` whose text is bounded, whatever ``problems`` holds (and ``more``
    problems not written out)."""
    shown = [_line(p) for p in problems[:MAX_PROBLEMS]]
    more += max(0, len(problems) - MAX_PROBLEMS)
    if more:
        shown.append(f"... and {more} more problems")
    return SpecError(printable(source)[:MAX_LINE], shown)


def _line(text: str) -> str:
    """One problem, escaped and cut; its own line breaks (an example) are kept."""
    text = "\n".join(printable(part) for part in text[: MAX_LINE * 4].split("\n"))
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."
