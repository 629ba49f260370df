"""Leak scanning: look for issued values (and their encodings) in files before they leave."""

from __future__ import annotations

import os
from pathlib import Path

from stockade.secrets.redact import Masker

CHUNK = 1024 * 1024


def scan_file(path: Path, masker: Masker) -> set[str]:
    """Names of the secrets found in the file at ``path`` (read without following links)."""
    if not masker:
        return set()
    found: set[str] = set()
    overlap = max(0, masker.longest - 1)
    tail = b""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(CHUNK):
            data = tail + chunk
            found |= masker.names_in(data)
            tail = data[-overlap:] if overlap else b""
    return found
