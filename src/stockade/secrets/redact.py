"""The one place that redacts secrets: every issued value and its encodings become ``***``.

For each registered value the masker also looks for each of its lines and its encodings:
base64 (standard and URL-safe, padded or not, the three shifted forms a value takes when it
sits mid-way in a longer base64 stream, and the 64- and 76-column lines that ``base64`` and PEM
wrap long encodings into), URL-encoding (``%XX`` upper and lower case, ``+`` for space), JSON
string escaping, shell quoting, and hex (lower and upper case). All variants go into one
Aho-Corasick automaton (leftmost-longest, a DFA), so the cost per byte does not grow with the
number of secrets.

No variant contains a newline (a multi-line value is masked line by line), so every complete
line can be masked and emitted at once. :class:`Redactor` is streaming-safe: a value split
across output chunks is still masked; it holds back only the unfinished last line, and never
more than ``longest variant - 1`` bytes of it.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import threading
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

from ahocorasick_rs import BytesAhoCorasick, Implementation, MatchKind

MASK = b"***"
MIN_VARIANT = 4
ADD_MASK = b"::add-mask::"
_SHELL_UNSAFE = re.compile(r"([^\w@%+=:,./-])")


WRAP_COLUMNS = (64, 76)  # PEM and base64(1) line lengths


def _b64_shifted(value: bytes, alphabet: str) -> set[bytes]:
    """Base64 of ``value`` at each of the three byte offsets within a longer stream."""
    encode = base64.urlsafe_b64encode if alphabet == "url" else base64.b64encode
    out = set()
    for k in range(3):
        text = encode(b"\0" * k + value)
        first = -(-8 * k // 6)  # the first character made only of value bits
        last = (8 * (k + len(value))) // 6  # one past the last such character
        out.add(text[first:last])
        if k == 0:
            out.add(text)  # the padded form
            for width in WRAP_COLUMNS:  # the lines of a wrapped encoding
                out.update(text[i:i + width] for i in range(0, len(text), width))
    return out


def variants(value: bytes) -> set[bytes]:
    """Every form of ``value`` the masker looks for (at least :data:`MIN_VARIANT` bytes)."""
    forms = {value}
    forms.update(line for line in re.split(rb"\r?\n", value) if line)
    for alphabet in ("std", "url"):
        forms |= _b64_shifted(value, alphabet)
    forms.add(value.hex().encode())
    forms.add(value.hex().upper().encode())
    text = value.decode("utf-8", errors="surrogateescape")
    try:
        url = quote(text, safe="")
        forms.update({url.encode(), quote_plus(text, safe="").encode(),
                      re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), url).encode()})
        forms.add(json.dumps(text)[1:-1].encode())
        forms.add(json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8", "surrogateescape"))
        forms.add(shlex.quote(text).encode("utf-8", "surrogateescape"))
        forms.add(_SHELL_UNSAFE.sub(r"\\\1", text).encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        pass  # not text: the byte-level forms above cover it
    return {f for f in forms if len(f) >= MIN_VARIANT and b"\n" not in f}


class Masker:
    """The automaton over all registered values; thread-safe to extend."""

    def __init__(self, values: Iterable[bytes] = ()) -> None:
        self._patterns: dict[bytes, str] = {}  # variant -> the name of its secret
        self._sorted: list[bytes] = []
        self._lock = threading.Lock()
        self._automaton: BytesAhoCorasick | None = None
        self.longest = 0
        self.add(*values)

    def add(self, *values: bytes, name: str = "add-mask") -> None:
        """Register values (and all their variants) to be masked from now on."""
        with self._lock:
            before = len(self._patterns)
            for value in values:
                for form in variants(value):
                    self._patterns.setdefault(form, name)
            if len(self._patterns) != before:
                patterns = self._sorted = sorted(self._patterns)
                # a DFA keeps the cost per byte flat however many secrets are registered
                self._automaton = BytesAhoCorasick(patterns,
                                                   matchkind=MatchKind.LeftmostLongest,
                                                   implementation=Implementation.DFA)
                self.longest = max(len(p) for p in patterns)

    def __bool__(self) -> bool:
        return self._automaton is not None

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        """Non-overlapping ``(start, end)`` of every variant in ``data``."""
        automaton = self._automaton
        if automaton is None:
            return []
        return [(s, e) for _, s, e in automaton.find_matches_as_indexes(data)]

    def names_in(self, data: bytes) -> set[str]:
        """The names of the secrets whose variants occur in ``data``."""
        automaton = self._automaton
        if automaton is None:
            return set()
        patterns = self._sorted
        return {self._patterns[patterns[i]] for i, _, _ in
                automaton.find_matches_as_indexes(data)}

    def mask(self, data: bytes) -> bytes:
        """``data`` with every variant replaced (for complete, non-streaming buffers)."""
        return _apply(data, self.spans(data), len(data))[0]


def _apply(data: bytes, spans: list[tuple[int, int]], upto: int) -> tuple[bytes, int]:
    """Mask the spans that start before ``upto``; return the output and how far it reaches."""
    out, pos = [], 0
    for start, end in spans:
        if start >= upto:
            break
        out.append(data[pos:start])
        out.append(MASK)
        pos = end
    end_at = max(pos, upto)
    out.append(data[pos:end_at])
    return b"".join(out), end_at


class Redactor:
    """Streaming masking of one output stream."""

    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Masked output that is safe to emit now (a value may straddle the next chunk)."""
        if not self.masker:
            return chunk
        data = self._pending + chunk if self._pending else chunk
        # a match starting before `safe` can no longer grow with bytes still to come: it is
        # either far enough from the end, or on a finished line (no variant spans a newline)
        safe = max(0, len(data) - self.masker.longest + 1, data.rfind(b"\n") + 1)
        out, used = _apply(data, self.masker.spans(data), safe)
        self._pending = data[used:]
        return out

    def flush(self) -> bytes:
        """Everything held back, masked (at the end of the stream)."""
        data, self._pending = self._pending, b""
        return self.masker.mask(data) if data else b""
