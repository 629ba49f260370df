"""Make text a job chose safe to record and print: control characters become visible and inert.

Anything a job controls (step output, artifact paths, egress destinations, error text) may carry
terminal control sequences: a carriage return that overwrites the line a viewer sees, ESC/CSI
sequences that recolour or move the cursor, OSC 52 (write the viewer's clipboard) and OSC 8
(hyperlinks), the 8-bit C1 forms of all of these, a newline that starts a forged record, or
Unicode bidi overrides that reorder what a reader sees (Trojan Source). Here each of them is
spelled out as plain ASCII text instead:

- ``\\n`` and ``\\r`` as ``\\n`` and ``\\r``; every other C0 control except tab, and DEL, as
  ``\\xNN`` (ESC is ``\\x1b``, so no escape sequence of any kind survives);
- C1 controls (U+0080 to U+009F), the bidi embeddings, overrides, isolates and marks and the Unicode
  line and paragraph separators as ``\\uNNNN``;
- in bytes, every byte that is not part of valid UTF-8 as ``\\xNN``, so a terminal in a legacy
  8-bit mode never sees a raw C1 byte (0x9B is CSI there) and the output is always valid UTF-8;
  in ``str``, the lone surrogates that ``surrogateescape`` decoding leaves for such bytes alike.

Backslashes are left alone: the result is meant to be read, not parsed back, and it contains
no control character whatever the input. Everything runs in linear time: valid UTF-8 is
escaped on the byte level (a check, then one ``bytes.replace`` per distinct unsafe character
present); anything else, and ``str``, with one regular-expression pass over a character class
(no backtracking) and a table lookup per character of each unsafe run it found.
"""

from __future__ import annotations

import functools
import re

_RANGES = ((0x00, 0x08), (0x0A, 0x1F), (0x7F, 0x9F),  # C0 but tab, DEL, C1
           (0x061C, 0x061C), (0x200E, 0x200F),  # bidi marks: ALM, LRM, RLM
           (0x2028, 0x202E),  # line and paragraph separators, LRE PDF RLE LRO RLO
           (0x2066, 0x2069),  # the isolates LRI RLI FSI PDI
           (0xD800, 0xDFFF))  # lone surrogates (surrogateescape leaves 0xDC80-0xDCFF)


def _spell(code: int) -> str:
    if code in (0x0A, 0x0D):
        return "\\n" if code == 0x0A else "\\r"
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape left it
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


class _Spellings(dict[int, str]):
    """Each unsafe character's spelling, made when first needed (``str.translate`` looks them
    up only for characters inside an unsafe run): no table of 2,000 surrogates at start-up."""

    def __missing__(self, code: int) -> str:
        self[code] = spelled = _spell(code)
        return spelled


_TABLE = _Spellings()


def _runs(ranges: tuple[tuple[int, int], ...]) -> re.Pattern[str]:
    """Runs of unsafe characters: the text between them is kept as it is, without a lookup
    per character (``str.translate`` is slow on non-ASCII text)."""
    return re.compile("([" + "".join(f"\\u{lo:04x}-\\u{hi:04x}" for lo, hi in ranges) + "]+)")


_RUNS = _runs(_RANGES)


@functools.cache
def _runs_but_newline() -> re.Pattern[str]:  # (text that is not UTF-8: compiled when seen)
    return _runs(((0x00, 0x08), (0x0B, 0x1F), *_RANGES[2:]))


# printable ASCII and tab: nothing to do (the common case, checked on bytes without decoding:
# deleting these bytes leaves nothing)
_PLAIN = b"\t" + bytes(range(0x20, 0x7F))
# in valid UTF-8 every unsafe character is one of these byte strings, and each of them can only
# be that character (UTF-8 is self-synchronising): escaping is a few bytes.replace() calls
_UTF8 = {chr(code).encode(): _TABLE[code].encode() for low, high in _RANGES[:-1]
         for code in range(low, high + 1)}
_NOT_C0 = bytes(b for b in range(256) if b == 0x09 or 0x20 <= b < 0x7F or b >= 0x80)


@functools.cache
def _multi() -> tuple[re.Pattern[bytes], ...]:
    """The multi-byte unsafe characters, one pattern per leading bytes (a literal prefix
    keeps a search fast); compiled when the first non-ASCII text is seen."""
    leads: dict[bytes, list[int]] = {}
    for seq in _UTF8:
        if len(seq) > 1:
            leads.setdefault(seq[:-1], []).append(seq[-1])
    return tuple(re.compile(re.escape(lead) + b"[" + b"".join(b"\\x%02x" % b for b in last)
                            + b"]") for lead, last in leads.items())


def escape_controls(text: str) -> str:
    """``text`` with every control character, bidi control and lone surrogate spelled out."""
    return _escape(text, _RUNS)


def _escape(text: str, runs: re.Pattern[str]) -> str:
    parts = runs.split(text)
    if len(parts) == 1:
        return text
    parts[1::2] = [run.translate(_TABLE) for run in parts[1::2]]
    return "".join(parts)


def escape_bytes(data: bytes) -> bytes:
    """``data`` as valid UTF-8 with controls spelled out and invalid bytes written ``\\xNN``."""
    if not data.translate(None, _PLAIN):
        return data
    escaped = _escape_utf8(data, b"")
    if escaped is not None:
        return escaped
    return escape_controls(data.decode("utf-8", "surrogateescape")).encode()


def escape_lines(data: bytes) -> bytes:
    """:func:`escape_bytes` of each line of ``data``, the ``\\n`` between them kept (for many
    records at once: faster than escaping them one by one)."""
    if not data.translate(None, _PLAIN + b"\n"):
        return data
    escaped = _escape_utf8(data, b"\n")
    if escaped is not None:
        return escaped
    return _escape(data.decode("utf-8", "surrogateescape"), _runs_but_newline()).encode()


def _escape_utf8(data: bytes, keep: bytes) -> bytes | None:
    """``data`` escaped on the byte level if it is valid UTF-8 (else None): linear, one pass
    per distinct unsafe character present (at most a few dozen)."""
    if not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError:
            return None
        for pattern in _multi():
            if pattern.search(data):
                for seq in set(pattern.findall(data)):
                    data = data.replace(seq, _UTF8[seq])
    for byte in set(data.translate(None, _NOT_C0 + keep)):
        char = bytes((byte,))
        data = data.replace(char, _UTF8[char])
    return data


def digits(text: str) -> bool:
    """Whether ``text`` is one or more ASCII digits (``str.isdigit`` also takes "²", which
    ``int`` refuses)."""
    return text.isascii() and text.isdigit()
