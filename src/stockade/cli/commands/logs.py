"""``stockade logs JOB [-f]``: the stored log of a job, here or on a server."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
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
    log = _LocalLog(settings, control, view.job.id)
    try:
        if args.follow:
            return _follow_local(log, control, view.job.id)
        out = LineEscaper(sys.stdout.buffer)
        for block in log.new():
            out.feed(block)
        if not log.found:
            raise _no_log(view.job.id, view.job.status)
        out.close()
    finally:
        log.close()
    return 0


def _no_log(job_id: str, status: str) -> Exception:
    from stockade.errors import UsageError

    return UsageError(f"job {job_id} has no stored log (status {status})",
                      hint="only jobs that reached a runner have logs")


class _LocalLog:
    """A job's log on this host: its log file (the jobs of stockade run) or, without one, the
    chunks runner agents sent (the jobs of a stockade server on this state directory)."""

    def __init__(self, settings: Settings, control: ControlService, job_id: str) -> None:
        self.path, self.store, self.job_id = settings.logs_dir / f"{job_id}.log", \
            control.store, job_id
        self.file: BinaryIO | None = None
        self.after, self.found = (0, -1), False

    def new(self) -> Iterator[bytes]:
        """What was added since the last call."""
        if self.file is None and self.after == (0, -1):
            with contextlib.suppress(FileNotFoundError):
                self.file = self.path.open("rb")
                self.found = True
        if self.file is not None:
            while block := self.file.read(BLOCK):
                yield block
            return
        while page := self.store.log_chunks(self.job_id, self.after, 4):
            for attempt, seq, data in page:
                self.after, self.found = (attempt, seq), True
                yield data

    def close(self) -> None:
        """Close the file, if one was opened."""
        if self.file is not None:
            self.file.close()


def _follow_local(log: _LocalLog, control: ControlService, job_id: str) -> int:
    """Print the log as it grows until the job has finished and all of it is out."""
    out = LineEscaper(sys.stdout.buffer)
    while True:
        job = control.job(job_id)  # before reading: once finished, the log is complete
        for block in log.new():
            out.feed(block)
        sys.stdout.buffer.flush()
        if job is None or job.status in FINISHED:
            if not log.found:
                raise _no_log(job_id, job.status if job else "unknown")
            out.close()
            return 0
        time.sleep(POLL_S)


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


def _char_boundary(data: bytes, at: int) -> int:
    """``at`` or a little earlier, so as not to split a UTF-8 sequence."""
    while at > 0 and data[at] & 0xC0 == 0x80:
        at -= 1
    return at
