"""Durations (``90s``, ``5m``, ``1h30m``) and sizes (``512Mi``, ``1G``) as users write them."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|k|K|M|G|T|B)?$")
_SIZE_FACTOR = {
    None: 1, "B": 1,
    "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4,
}

DURATION_HINT = "use e.g. 90s, 5m, 1h or 1h30m"
SIZE_HINT = "use e.g. 512Mi, 2Gi or 100M (Ki/Mi/Gi are powers of 1024, k/M/G of 1000)"


def parse_duration(text: str) -> float:
    """Seconds in ``text`` (``1h30m``, ``90s``, ``500ms``); ``ValueError`` if malformed."""
    m = _DURATION.match(text.strip())
    if not text.strip() or not m or not any(m.groups()):
        raise ValueError(f"{text!r} is not a duration; {DURATION_HINT}")
    h, mi, s, ms = (int(g) if g else 0 for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def parse_size(text: str | int) -> int:
    """Bytes in ``text`` (``512Mi``, ``1G``, ``4096``); ``ValueError`` if malformed."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size; {SIZE_HINT}")
    return int(float(m.group(1)) * _SIZE_FACTOR[m.group(2)])


def format_size(n: int) -> str:
    """A short human form of ``n`` bytes (``1.5 MiB``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`: ``5400.0`` → ``1h30m``."""
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s else "",
             f"{ms}ms" if ms else ""]
    return "".join(parts) or "0s"
