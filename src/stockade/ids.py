"""Typed identifiers and their generators."""

from __future__ import annotations

import os
import time
from typing import NewType

JobId = NewType("JobId", str)
RunnerId = NewType("RunnerId", str)

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def _b32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_job_id() -> JobId:
    """A time-sortable, unique job id such as ``j01hq3v8k2m4x7p9w`` (valid as a hostname)."""
    millis = int(time.time() * 1000)
    rand = int.from_bytes(os.urandom(5), "big")
    return JobId("j" + _b32(millis, 9) + _b32(rand, 8))


def new_runner_id(prefix: str = "local") -> RunnerId:
    """A unique runner id such as ``local-3k9x2m4q``."""
    return RunnerId(f"{prefix}-{_b32(int.from_bytes(os.urandom(5), 'big'), 8)}")


def new_installation_id() -> str:
    """A random id of one stockade installation such as ``i3k9x2m4q7``."""
    return "i" + _b32(int.from_bytes(os.urandom(6), "big"), 9)
