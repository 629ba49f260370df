"""The job log: masked, timestamped lines, live on a stream and stored with a size cap.

Output is processed chunk by chunk; a partial line is held back only up to ``MAX_LINE`` bytes,
so a flood of output (or one endless line) never makes the runner buffer more than that.
Everything goes through the job's masker first (``secrets/redact.py``), and a line
``::add-mask::VALUE`` registers VALUE (a value derived from a secret) for masking from then on.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from stockade.secrets.redact import ADD_MASK, MIN_VARIANT, Masker, Redactor

MAX_LINE = 16 * 1024
# step output is "HH:MM:SS | text", stockade's own lines "HH:MM:SS ==> text": a job cannot
# print a line that passes for one of stockade's (a fake "step succeeded", say)
OUTPUT_MARK = b"| "


class JobLog:
    """Writes the log of one job to ``path`` (capped) and to ``live`` (capped the same way)."""

    def __init__(self, path: Path, cap: int, live: BinaryIO | None) -> None:
        self.path = path
        self.masker = Masker()
        self._redactor = Redactor(self.masker)
        self._on_add_mask: Callable[[int], None] | None = None
        self.cap = cap
        self.live = live
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=256 * 1024)
        self.written = 0
        self.dropped = 0
        self._partial = b""
        self._lock = threading.RLock()  # the egress proxy's thread writes notes too

    def use_masker(self, masker: Masker, on_add_mask: Callable[[int], None]) -> None:
        """Mask with the job's secrets from now on (before any step output arrives)."""
        self.masker = masker
        self._redactor = Redactor(masker)
        self._on_add_mask = on_add_mask

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
        with self._lock:  # never flushes the redactor: a value may straddle the next chunk
            line = self.masker.mask(text.encode()) if self.masker else text.encode()
            self._emit(self._stamp() + b"==> " + line + b"\n")
            if self.live is not None:
                self.live.flush()

    def output(self, chunk: bytes) -> None:
        """Raw output of a step: masked, then split into timestamped lines."""
        with self._lock:
            self._lines(self._redactor.feed(chunk))

    def _lines(self, masked: bytes) -> None:
        lines = (self._partial + masked).split(b"\n")
        self._partial = lines.pop()
        stamp = self._stamp() + OUTPUT_MARK
        if lines:
            self._emit(b"".join(stamp + line + b"\n" for line in self._add_masks(lines)))
        while len(self._partial) >= MAX_LINE:
            head, self._partial = self._partial[:MAX_LINE], self._partial[MAX_LINE:]
            self._emit(stamp + head + b"\n")
        if self.live is not None and lines:
            self.live.flush()

    def _add_masks(self, lines: list[bytes]) -> list[bytes]:
        """Register ``::add-mask::`` values; re-mask the lines after one with the new masks."""
        registered = False
        for i, line in enumerate(lines):
            if registered:
                lines[i] = line = self.masker.mask(line)
            if line.lstrip().startswith(ADD_MASK):
                value = line.lstrip()[len(ADD_MASK):].strip()
                if len(value) >= MIN_VARIANT:
                    self.masker.add(value)
                    registered = True
                    if self._on_add_mask is not None:
                        self._on_add_mask(len(value))
                lines[i] = ADD_MASK + b"***"
        if registered:
            self._partial = self.masker.mask(self._partial)
        return lines

    def flush_partial(self) -> None:
        """End an unterminated last line (at the end of a step)."""
        self._lines(self._redactor.flush())
        if self._partial:
            self._emit(self._stamp() + OUTPUT_MARK + self._partial + b"\n")
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
