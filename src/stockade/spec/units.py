"""Durations (``90s``, ``5m``, ``1h30m``) and sizes (``512Mi``, ``1G``) as users write them.

Both parsers are bounded: at most :data:`MAX_DIGITS` digits per number and exact integer
arithmetic, so no input can raise anything but ``ValueError`` (no ``OverflowError`` from a
400-digit size, no int-conversion limit from a 5,000-digit one).
"""

from __future__ import annotations

import re

MAX_DIGITS = 15
MAX_SIZE = 2**62  # far above any real limit, far below what the kernel's 64-bit fields hold

_DURATION = re.compile(r"(?:([0-9]+)h)?(?:([0-9]+)m(?!s))?(?:([0-9]+)s)?(?:([0-9]+)ms)?")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)[ \t]*(Ki|Mi|Gi|Ti|k|K|M|G|T|B)?")
_SIZE_FACTOR = {
    None: 1, "B": 1,
    "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4,
}
_BINARY_UNITS = (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024))

DURATION_HINT = "use e.g. 90s, 5m, 1h or 1h30m"
SIZE_HINT = "use e.g. 512Mi, 2Gi or 100M (Ki/Mi/Gi are powers of 1024, k/M/G of 1000)"


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def parse_duration(text: str) -> float:
    """Seconds in ``text`` (``1h30m``, ``90s``, ``500ms``); ``ValueError`` if malformed."""
    stripped = text.strip()
    m = _DURATION.fullmatch(stripped)
    if not stripped or not m or not any(m.groups()):
        raise ValueError(f"{_shown(text)} is not a duration; {DURATION_HINT}")
    if any(g and len(g) > MAX_DIGITS for g in m.groups()):
        raise ValueError(f"{_shown(text)} has a number longer than {MAX_DIGITS} digits; "
                         f"{DURATION_HINT}")
    h, mi, s, ms = (int(g) if g else 0 for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def parse_size(text: str | int) -> int:
    """Bytes in ``text`` (``512Mi``, ``1G``, ``4096``); ``ValueError`` if malformed or above
    :data:`MAX_SIZE`."""
    if isinstance(text, int):
        if abs(text) > MAX_SIZE:
            raise ValueError(f"a size of {_digits(text)} digits is too large; {SIZE_HINT}")
        return text
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{_shown(text)} is not a size; {SIZE_HINT}")
    if len(m.group(1)) > MAX_DIGITS + 1:
        raise ValueError(f"{_shown(text)} has more than {MAX_DIGITS} digits; {SIZE_HINT}")
    whole, _, fraction = m.group(1).partition(".")
    factor = _SIZE_FACTOR[m.group(2)]  # exact: no float rounding for 1.1Gi and the like
    size = int(whole) * factor + (int(fraction) * factor // 10 ** len(fraction) if fraction else 0)
    if size > MAX_SIZE:
        raise ValueError(f"{_shown(text)} is too large; {SIZE_HINT}")
    return size


def _digits(n: int) -> str:
    """The number of decimal digits of ``n``, without converting a huge int to text."""
    bits = abs(n).bit_length()
    return f"about {int(bits * 0.30103) + 1}" if bits > 10_000 else str(len(str(abs(n))))


def format_size(n: int) -> str:
    """A short human form of ``n`` bytes (``1.5 MiB``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_spec_size(n: int) -> str:
    """``n`` bytes the way a spec writes it: ``16Gi`` when exact, else a plain byte count."""
    for unit, factor in _BINARY_UNITS:
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`: ``5400.0`` → ``1h30m``."""
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s else "",
             f"{ms}ms" if ms else ""]
    return "".join(parts) or "0s"
