"""The job log: timestamped lines, live on a stream and stored with a size cap.

Output is processed chunk by chunk; a partial line is held back only up to ``MAX_LINE`` bytes,
so a flood of output (or one endless line) never makes the runner buffer more than that.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import BinaryIO

MAX_LINE = 16 * 1024


class JobLog:
    """Writes the log of one job to ``path`` (capped) and to ``live`` (capped the same way)."""

    def __init__(self, path: Path, cap: int, live: BinaryIO | None) -> None:
        self.path = path
        self.cap = cap
        self.live = live
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=256 * 1024)
        self.written = 0
        self.dropped = 0
        self._partial = b""
        self._lock = threading.RLock()  # the egress proxy's thread writes notes too

    def _emit(self, data: bytes) -> None:
        if self.written >= self.cap:
            self.dropped += len(data)
            return
        room = self.cap - self.written
        if len(data) > room:
            self.dropped += len(data) - room
            data = data[:room]
        self.written += len(data)
        self._file.write(data)
        if self.live is not None:
            self.live.write(data)

    def _stamp(self) -> bytes:
        return time.strftime("%H:%M:%S ", time.localtime()).encode()

    def note(self, text: str) -> None:
        """A line from stockade itself (step headers, summaries), marked with ``==>``."""
        with self._lock:
            self.flush_partial()
            self._emit(self._stamp() + b"==> " + text.encode() + b"\n")
            if self.live is not None:
                self.live.flush()

    def output(self, chunk: bytes) -> None:
        """Raw output of a step; split into timestamped lines."""
        with self._lock:
            self._output(chunk)

    def _output(self, chunk: bytes) -> None:
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        stamp = self._stamp()
        if lines:
            self._emit(b"".join(stamp + line + b"\n" for line in lines))
        while len(self._partial) >= MAX_LINE:
            head, self._partial = self._partial[:MAX_LINE], self._partial[MAX_LINE:]
            self._emit(stamp + head + b"\n")
        if self.live is not None and lines:
            self.live.flush()

    def flush_partial(self) -> None:
        """End an unterminated last line."""
        if self._partial:
            self._emit(self._stamp() + self._partial + b"\n")
            self._partial = b""

    def close(self) -> None:
        """Flush, and mark truncation if the cap was reached."""
        self.flush_partial()
        if self.dropped:
            marker = (f"\n[stockade: log truncated at {self.cap} bytes; "
                      f"{self.dropped} more bytes were dropped]\n").encode()
            self._file.write(marker)
            if self.live is not None:
                self.live.write(marker)
        self._file.close()
        if self.live is not None:
            self.live.flush()
