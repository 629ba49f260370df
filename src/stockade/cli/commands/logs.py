"""``stockade logs JOB [-f]``: the stored log of a job, here or on a server."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, BinaryIO

from stockade.cli.remote import add_server_argument

if TYPE_CHECKING:
    from stockade.cli.remote import Remote
    from stockade.config import Settings
    from stockade.control import ControlService

HELP = "print a job's stored log"
DESCRIPTION = """\
Print the stored (size-capped) log of a job to stdout; with -f, follow it as the job runs
until it ends. Control characters are spelled out (\\x1b, \\r, \\u202e, ...) so that nothing in
the log acts on the terminal, even in logs stored by older versions of stockade.

With --server (or $STOCKADE_SERVER) the job is a server's (a viewer token in
$STOCKADE_TOKEN): -f then follows the log the job's runner sends, through whichever replica
answers."""

BLOCK = 64 * 1024
POLL_S = 0.2
FINISHED = ("succeeded", "failed", "denied", "error")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``JOB [-f] [--server URL]``."""
    p.add_argument("job", metavar="JOB", help="job id or a unique prefix of it")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing the log as the job writes it, until the job ends")
    add_server_argument(p)


def main(args: argparse.Namespace) -> int:
    """Copy the log to stdout, escaped."""
    from stockade.cli.remote import connect

    remote = connect(args)
    if remote is not None:
        return _remote(remote, args.job, args.follow)
    from stockade.cli.context import open_control, require_job

    settings, control = open_control()
    view = require_job(control, args.job)
    if args.follow:
        return _follow_local(settings, control, view.job.id)
    path = settings.logs_dir / f"{view.job.id}.log"
    try:
        with path.open("rb") as f:
            copy_escaped(f, sys.stdout.buffer)
    except FileNotFoundError:
        raise _no_log(view.job.id, view.job.status) from None
    return 0


def _no_log(job_id: str, status: str) -> Exception:
    from stockade.errors import UsageError

    return UsageError(f"job {job_id} has no stored log (status {status})",
                      hint="only jobs that reached a runner have logs")


def _follow_local(settings: Settings, control: ControlService, job_id: str) -> int:
    """Print the log file as it grows until the job has finished and all of it is out."""
    out = LineEscaper(sys.stdout.buffer)
    path, f = settings.logs_dir / f"{job_id}.log", None
    try:
        while True:
            job = control.job(job_id)  # before reading: once finished, the log is complete
            done = job is None or job.status in FINISHED
            if f is None:
                try:
                    f = path.open("rb")
                except FileNotFoundError:
                    if done:
                        raise _no_log(job_id, job.status if job else "unknown") from None
            while f is not None and (block := f.read(BLOCK)):
                out.feed(block)
            sys.stdout.buffer.flush()
            if done:
                out.close()
                return 0
            time.sleep(POLL_S)
    finally:
        if f is not None:
            f.close()


def _remote(remote: Remote, id_or_prefix: str, follow: bool) -> int:
    """The log of a server's job (followed live with ``follow``)."""
    job_id = remote.job_id(id_or_prefix)
    out = LineEscaper(sys.stdout.buffer)
    if follow:
        for event in remote.events(f"/api/v1/jobs/{job_id}/log/stream", "viewer"):
            if event.kind == "message":
                out.feed(event.data.encode())
                sys.stdout.buffer.flush()
    if not out.written:  # (a job stockade run ran on the server's host: its log file)
        with remote.request("GET", f"/api/v1/jobs/{job_id}/log", "viewer") as response:
            for block in response.iter_bytes(BLOCK):
                out.feed(block)
    if not out.written:
        job = remote.json("GET", f"/api/v1/jobs/{job_id}", "viewer")
        raise _no_log(job_id, str(job.get("status")))
    out.close()
    return 0


class LineEscaper:
    """Writes what it is fed to ``dst`` line by line, every control character but the newline
    ending a line spelled out; memory stays bounded (a long line is escaped in blocks)."""

    def __init__(self, dst: BinaryIO) -> None:
        self.dst, self.rest, self.written = dst, b"", 0

    def feed(self, block: bytes) -> None:
        """Write the complete lines of what came so far."""
        from stockade.text import escape_lines

        self.written += len(block)
        data = self.rest + block
        end = data.rfind(b"\n") + 1
        if not end:  # no line end in sight: escape up to a character boundary
            end = _char_boundary(data, len(data) - 3) if len(data) >= BLOCK else 0
        self.dst.write(escape_lines(data[:end]))
        self.rest = data[end:]

    def close(self) -> None:
        """Write the rest (a last line without its end)."""
        from stockade.text import escape_lines

        self.dst.write(escape_lines(self.rest))
        self.rest = b""


def copy_escaped(src: BinaryIO, dst: BinaryIO) -> None:
    """Copy ``src`` to ``dst`` through a :class:`LineEscaper`."""
    out = LineEscaper(dst)
    while block := src.read(BLOCK):
        out.feed(block)
    out.close()


def _char_boundary(data: bytes, at: int) -> int:
    """``at`` or a little earlier, so as not to split a UTF-8 sequence."""
    while at > 0 and data[at] & 0xC0 == 0x80:
        at -= 1
    return at
