"""The job log: masked, escaped, timestamped records, stored with caps and shown live.

Every record is one line: ``HH:MM:SS | text`` for a line of step output, ``HH:MM:SS ==> text``
for a note of stockade's own (step headers, failures, the summary). A job cannot forge a note:
its lines are marked ``| ``, and no record contains a newline, CR, ESC or any other control
character, because everything is control-escaped (``stockade.text``) after masking. Step
output is split into lines at ``\\n``, ``\\r\\n`` and a lone ``\\r``.

Two maskers (``secrets/redact.py``): :attr:`JobLog.masker` holds the broker's secrets and masks
everything, notes included; :attr:`JobLog.job_masker` holds what the job registered with
``::add-mask::VALUE`` (``%0A``, ``%0D`` and ``%25`` decoded) and masks only what the job chose:
its output and the strings stockade embeds through :meth:`JobLog.job_text`, so a job cannot
censor stockade's notes.

Budgets: step output is stored up to ``cap`` bytes; stockade's notes have their own budget
(:data:`NOTE_BUDGET`), so the failure and the summary are written after a flood of output. A
partial line is held back only up to :data:`MAX_LINE` bytes. Live output goes through
:class:`LiveStream`, whose thread is the only one that ever waits for the viewer: a stalled
reader loses live lines (a line says how many), never blocks the job, and the stored log stays
complete.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from stockade.errors import InfrastructureError
from stockade.secrets.redact import ADD_MASK, Masker, Redactor, decode_add_mask
from stockade.text import escape_bytes, escape_lines

MAX_LINE = 16 * 1024
NOTE_BUDGET = 1024 * 1024  # bytes of stockade's own notes per job, apart from the output cap
KEEP_ON_ERROR = 64 * 1024  # what is kept of a log the file system had no room for
MAX_NOTE = 4096  # one note's text at most (a note may quote a job-chosen string)
OUTPUT_MARK = b"| "
NOTE_MARK = b"==> "
LIVE_QUEUE = 1024 * 1024  # live bytes waiting for a slow reader before lines are dropped
LIVE_STALL_S = 1.0  # at the end, give up on a reader that has taken nothing for this long
LIVE_DRAIN_S = 10.0  # ... or that is still behind after this long


class JobLog:
    """Writes the log of one job to ``path`` (capped) and to ``live`` (without ever blocking)."""

    def __init__(self, path: Path, cap: int, live: BinaryIO | None,
                 note_budget: int = NOTE_BUDGET) -> None:
        self.path = path
        self.masker = Masker()  # the job's secrets: mask everything
        self.job_masker = Masker()  # ::add-mask:: values: mask only what the job chose
        self._redactors = (Redactor(self.masker), Redactor(self.job_masker))
        self._on_add_mask: Callable[[int], None] | None = None
        self.cap = cap
        self.note_budget = note_budget
        self.live = LiveStream(live) if live is not None else None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=256 * 1024)
        self.written = 0  # bytes of step output stored
        self.output_dropped = 0
        self.notes_written = 0
        self.notes_dropped = 0
        self._full = False
        self._partial = b""
        self._refusals: list[str] = []  # ::add-mask:: refusals, noted after the lines before
        self._swallowing = False  # in an ::add-mask:: line too long to hold: drop the rest
        self._lock = threading.RLock()  # the egress proxy's thread writes notes too
        self.disk_error: OSError | None = None  # the log could not be written: it is removed
        self._disk_error_raised = False
        self._closed = False

    @property
    def dropped(self) -> int:
        """Bytes not stored: step output beyond the cap, notes beyond their budget."""
        return self.output_dropped + self.notes_dropped

    def use_masker(self, masker: Masker, on_add_mask: Callable[[int], None]) -> None:
        """Mask with the job's secrets from now on (before any step output arrives);
        ``on_add_mask(length)`` is told of each ``::add-mask::`` value registered."""
        with self._lock:
            self.masker = masker
            self._redactors = (Redactor(masker), self._redactors[1])
            self._on_add_mask = on_add_mask

    def _stamp(self) -> bytes:
        return time.strftime("%H:%M:%S ", time.localtime()).encode()

    def _store(self, data: bytes, note: bool = False) -> None:
        if self.disk_error is None:
            try:
                self._file.write(data)
            except OSError as e:
                self._lose(e)
        if self.live is not None:
            self.live.write(data, keep=note)

    def _flush(self) -> None:
        """Hand what is stored to the kernel: `stockade logs` shows a running job's output,
        and a runner killed at any moment leaves its log behind (one write per chunk)."""
        if self.disk_error is None:
            try:
                self._file.flush()
            except OSError as e:
                self._lose(e)

    def _lose(self, error: OSError) -> None:
        """The log cannot be written (a full file system): cut it to its first KEEP_ON_ERROR
        bytes, so that the space is there again for the job's result and the start of the
        log tells what ran, and store nothing more."""
        self.disk_error = error
        with contextlib.suppress(OSError):
            self._file.close()  # the raw file is closed even when the last flush fails
        with contextlib.suppress(OSError):
            if self.path.stat().st_size > KEEP_ON_ERROR:
                os.truncate(self.path, KEEP_ON_ERROR)
            with self.path.open("ab") as f:
                f.write(self._stamp() + NOTE_MARK + b"log cut here: the file system is full ("
                        + (error.strerror or "").encode() + b")\n")

    def check_stored(self) -> None:
        """Raise InfrastructureError (once) if the log could not be stored."""
        if self.disk_error is not None and not self._disk_error_raised:
            self._disk_error_raised = True
            raise InfrastructureError(
                f"the job log could not be stored ({self.disk_error.strerror}); the job was "
                f"stopped and its log cut to its first {KEEP_ON_ERROR // 1024} KiB",
                hint=f"free space on the file system of {self.path.parent}")

    def _clean(self, data: bytes, maskers: tuple[Masker, ...]) -> bytes:
        """Masked, then control-escaped; masked again if escaping changed anything (so that
        escaping cannot spell out a secret the job printed in a disguised form)."""
        data = _mask(data, maskers)
        escaped = escape_bytes(data)
        if len(escaped) == len(data):  # escaping always lengthens what it changes
            return data
        # masking may cut a multi-byte character in two: escape what that leaves
        return escape_bytes(_mask(escaped, maskers))

    def job_text(self, text: str) -> str:
        """A job-chosen string (a path, a destination, an error), masked with the secrets and
        the job's own masks and control-escaped: safe to embed in a note or a record."""
        data = text.encode("utf-8", "surrogateescape")
        return self._clean(data, (self.masker, self.job_masker)).decode("utf-8")

    def note(self, text: str) -> None:
        """A line from stockade itself, marked ``==>``: masked with the secrets (never with
        the job's masks) and control-escaped. Embed job-chosen strings with :meth:`job_text`."""
        data = self._clean(text.encode("utf-8", "surrogateescape"), (self.masker,))
        if len(data) > MAX_NOTE:
            data = data[:_char_boundary(data, MAX_NOTE)] + b"... (note cut)"
        with self._lock:  # never flushes the redactors: a value may straddle the next chunk
            self._note_record(self._stamp() + NOTE_MARK + data + b"\n")
            self._flush()

    def _note_record(self, record: bytes, always: bool = False) -> None:
        if not always and self.notes_written + len(record) > self.note_budget:
            if not self.notes_dropped:
                self._store(self._stamp() + NOTE_MARK + b"stockade's notes reached their budget"
                            b" (%d bytes): further notes are dropped\n" % self.note_budget, True)
            self.notes_dropped += len(record)
            return
        if not always:
            self.notes_written += len(record)
        self._store(record, note=True)

    def output(self, chunk: bytes) -> None:
        """Raw output of a step: masked, split into lines, escaped and timestamped."""
        with self._lock:
            for redactor in self._redactors:
                chunk = redactor.feed(chunk)
            self._lines(chunk)
            self._flush()
        self.check_stored()  # stops the step: its output has nowhere to go

    def _lines(self, masked: bytes) -> None:
        data = self._partial + masked
        held = data.endswith(b"\r")  # maybe the first half of a CRLF still to come
        if held:
            data = data[:-1]
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = data.split(b"\n")
        self._partial = lines.pop() + (b"\r" if held else b"")
        if lines and self._swallowing:  # the end of an overlong ::add-mask:: line
            self._swallowing = False
            del lines[0]
        if lines and ADD_MASK in data:
            lines = self._add_masks(lines)
        if lines:
            self._output_records(lines)
        while len(self._partial) >= MAX_LINE:
            cut = _char_boundary(self._partial, MAX_LINE)
            head, self._partial = self._partial[:cut], self._partial[cut:]
            if self._swallowing:
                continue
            if head.lstrip().startswith(ADD_MASK):  # never print the value it meant to mask
                self._swallowing = True
                self._refusals.append(f"the line is longer than {MAX_LINE} bytes")
                head = ADD_MASK + b"***"
            self._output_records([head])
        for refusal in self._refusals:
            self.note(f"::add-mask:: refused: {refusal}")
        self._refusals.clear()

    def _add_masks(self, lines: list[bytes]) -> list[bytes]:
        """Register ``::add-mask::`` values; re-mask the lines after one with the new masks."""
        registered = False
        for i, line in enumerate(lines):
            if registered:
                lines[i] = line = self.job_masker.mask(line)
            command = line.strip()
            if command.startswith(ADD_MASK):
                registered |= self._add_mask(decode_add_mask(command[len(ADD_MASK):].strip()))
                lines[i] = ADD_MASK + b"***"
        if registered:
            self._partial = self.job_masker.mask(self._partial)
        return lines

    def _add_mask(self, value: bytes) -> bool:
        """Register one job mask, or note why it was refused (never the value itself)."""
        refusal = self.job_masker.add_job_mask(value)  # None, or why not (the per-job limits)
        if refusal is not None:
            self._refusals.append(refusal)
            return False
        if self._on_add_mask is not None:
            self._on_add_mask(len(value))
        return True

    def _output_records(self, lines: list[bytes]) -> None:
        stamp = self._stamp() + OUTPUT_MARK
        if self._full:
            self.output_dropped += sum(len(stamp) + len(line) + 1 for line in lines)
            return
        body = b"\n".join(lines)  # no line holds a newline: escape and stamp them all at once
        escaped = escape_lines(body)
        if len(escaped) != len(body):  # masked again, and what masking may have cut escaped
            escaped = escape_lines(_mask(escaped, (self.masker, self.job_masker)))
        data = stamp + escaped.replace(b"\n", b"\n" + stamp) + b"\n"
        room = self.cap - self.written
        if len(data) > room:
            self.output_dropped += len(data) - room
            data = data[:room]
            self._full = True
        self.written += len(data)
        if data and not data.endswith(b"\n"):
            data += b"\n"  # a record cut at the cap still ends its line
        self._store(data)
        if self._full:
            self.note(f"the job's output reached the log cap ({self.cap} bytes): further "
                      "output is not stored")

    def flush_partial(self) -> None:
        """End an unterminated last line (at the end of a step)."""
        with self._lock:
            first, second = self._redactors
            self._lines(second.feed(first.flush()) + second.flush())
            last = self._partial.removesuffix(b"\r")
            self._partial = b""
            if self._swallowing:
                self._swallowing = False
            elif last:
                self._output_records([last])
            self._flush()

    def close(self) -> None:
        """Flush, note what was dropped, and let the live stream drain (bounded in time);
        closing again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.flush_partial()
            if self.dropped:
                self._note_record(self._stamp() + NOTE_MARK + (
                    f"log truncated at {self.cap} bytes of job output; {self.output_dropped} "
                    f"more bytes of output and {self.notes_dropped} bytes of notes were "
                    "dropped\n").encode(), always=True)
            if self.disk_error is None:
                try:
                    self._file.close()
                except OSError as e:
                    self._lose(e)
        if self.live is not None:
            self.live.close()


def _mask(data: bytes, maskers: tuple[Masker, ...]) -> bytes:
    for masker in maskers:
        if masker:
            data = masker.mask(data)
    return data


def _char_boundary(data: bytes, at: int) -> int:
    """``at``, moved back (at most 3 bytes) so that it does not split a UTF-8 sequence."""
    if at >= len(data):
        return at
    for cut in range(at, max(0, at - 3), -1):
        if data[cut] & 0xC0 != 0x80:
            return cut
    return at


class LiveStream:
    """Live output for a viewer, written by a thread of its own: a slow or stalled reader never
    blocks the job.

    At most :data:`LIVE_QUEUE` bytes of output wait for the reader; beyond that whole records
    are dropped until half of the queue has drained, and a line says how many bytes were not
    shown. Stockade's notes are always queued (they have a budget of their own), so a reader
    that catches up sees every failure and the summary.
    On a pipe or a terminal the thread waits for room with ``poll`` and writes at most
    ``PIPE_BUF`` bytes at a time, so it can always stop; :meth:`close` waits for the reader only
    while it makes progress (:data:`LIVE_STALL_S`), and never longer than :data:`LIVE_DRAIN_S`.
    """

    def __init__(self, out: BinaryIO, limit: int = LIVE_QUEUE) -> None:
        self._out = out
        self._fd, self._chunk = _raw_fd(out)
        self._limit = limit
        self._queue: deque[bytes] = deque()
        self._pending = 0  # bytes queued or being written
        self._dropping = False
        self._unreported = 0  # bytes dropped since the last line that said so
        self.dropped = 0
        self.sent = 0
        self._closing = self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="stockade-live-log", daemon=True)
        self._thread.start()

    def write(self, data: bytes, keep: bool = False) -> None:
        """Queue ``data`` (whole records) for the viewer, or drop it if the viewer is behind
        (unless ``keep``)."""
        with self._cond:
            if self._stopped:
                self.dropped += len(data)
                return
            if self._dropping:  # resume once the reader has caught up by half the queue
                self._dropping = self._pending > self._limit // 2
            if not keep and (self._dropping or self._pending + len(data) > self._limit):
                self._dropping = True
                self.dropped += len(data)
                self._unreported += len(data)
                return
            self._report_dropped()
            self._enqueue(data)

    def _enqueue(self, data: bytes) -> None:
        self._queue.append(data)
        self._pending += len(data)
        self._cond.notify_all()

    def _report_dropped(self) -> None:
        if self._unreported:
            self._enqueue(time.strftime("%H:%M:%S ").encode() + NOTE_MARK + (
                f"live log: {self._unreported} bytes were not shown here because the reader "
                "did not keep up; the stored log (stockade logs JOB) has them\n").encode())
            self._unreported = 0

    def _run(self) -> None:
        # signals are the main thread's business (cancelling the job): never this thread's
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or self._stopped:
                    return
                data = b"".join(self._queue)
                self._queue.clear()
            done = self._send(data)
            with self._cond:
                self._pending -= len(data)
                if not done:  # the reader went away, or close() gave up on it
                    self._stopped = True
                    self.dropped += len(data)
                    return

    def _send(self, data: bytes) -> bool:
        try:
            if self._fd is None:
                self._out.write(data)
                self._out.flush()
                self.sent += len(data)
                return True
            view = memoryview(data)
            poller = select.poll()
            poller.register(self._fd, select.POLLOUT)
            while view:
                if not poller.poll(100):
                    if self._stopped:
                        return False
                    continue
                n = os.write(self._fd, view[:self._chunk])
                view = view[n:]
                self.sent += n
            return True
        except (OSError, ValueError):  # a closed pipe or stream: nobody is watching any more
            return False

    def close(self) -> None:
        """Say what was dropped, then wait for the reader while it keeps up (bounded)."""
        with self._cond:
            if not self._stopped:
                self._report_dropped()
            self._closing = True
            self._cond.notify_all()
        started = progress_at = time.monotonic()
        sent = self.sent
        while self._thread.is_alive():
            self._thread.join(0.05)
            now = time.monotonic()
            if self.sent != sent:
                sent, progress_at = self.sent, now
            elif now - progress_at > LIVE_STALL_S or now - started > LIVE_DRAIN_S:
                break
        with self._cond:
            self._stopped = True  # the thread stops at its next poll timeout
            self._cond.notify_all()


def _raw_fd(out: BinaryIO) -> tuple[int | None, int]:
    """The file descriptor behind ``out`` (flushed first) and the most to write at once to it:
    ``PIPE_BUF`` unless it is a regular file (None: write through ``out`` itself)."""
    try:
        out.flush()
        fd = out.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, io.UnsupportedOperation):
        return None, 0
    return fd, (1024 * 1024 if stat.S_ISREG(mode) else select.PIPE_BUF)
