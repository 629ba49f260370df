"""``stockade logs JOB``: the stored log of a job."""

from __future__ import annotations

import argparse
import sys
from typing import BinaryIO

HELP = "print a job's stored log"
DESCRIPTION = """\
Print the stored (size-capped) log of a job to stdout. Control characters are spelled out
(\\x1b, \\r, \\u202e, ...) so that nothing in the log acts on the terminal, even in logs stored
by older versions of stockade."""

BLOCK = 64 * 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``JOB``."""
    p.add_argument("job", metavar="JOB", help="job id or a unique prefix of it")


def main(args: argparse.Namespace) -> int:
    """Copy the log file to stdout, escaped."""
    from stockade.cli.context import open_control, require_job
    from stockade.errors import UsageError

    settings, control = open_control()
    view = require_job(control, args.job)
    path = settings.logs_dir / f"{view.job.id}.log"
    try:
        with path.open("rb") as f:
            copy_escaped(f, sys.stdout.buffer)
    except FileNotFoundError:
        raise UsageError(f"job {view.job.id} has no stored log (status {view.job.status})",
                         hint="only jobs that reached a runner have logs") from None
    return 0


def copy_escaped(src: BinaryIO, dst: BinaryIO) -> None:
    """Copy ``src`` to ``dst`` line by line with every control character but the newline
    ending a line spelled out; memory stays bounded (a long line is escaped in blocks)."""
    from stockade.text import escape_lines

    rest = b""
    while block := src.read(BLOCK):
        data = rest + block
        end = data.rfind(b"\n") + 1
        if not end:  # no line end in sight: escape up to a character boundary
            end = _char_boundary(data, len(data) - 3) if len(data) >= BLOCK else 0
        dst.write(escape_lines(data[:end]))
        rest = data[end:]
    dst.write(escape_lines(rest))


def _char_boundary(data: bytes, at: int) -> int:
    """``at`` or a little earlier, so as not to split a UTF-8 sequence."""
    while at > 0 and data[at] & 0xC0 == 0x80:
        at -= 1
    return at
