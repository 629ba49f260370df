"""The forms a secret takes in output: the patterns :mod:`stockade.secrets.redact` masks.

See that module's docstring for the list of forms and why long forms are cut into pieces.
This module only computes them (:func:`variants`, :func:`patterns`) and decodes
``::add-mask::`` values (:func:`decode_add_mask`); it never redacts anything itself.
"""

from __future__ import annotations

import itertools
import json
import re
from urllib.parse import quote, quote_plus

MIN_VARIANT = 4
PIECE = 64  # longer forms are cut into pieces of 64 to 127 bytes
WRAP_COLUMNS = (64, 76)  # PEM and base64(1) line lengths (PIECE is one of them)
# a job's values are matched after folding these bytes in patterns and text (hex case, the two
# base64 alphabets): ~40% fewer patterns to build, at the price of masking "DEAD+beef" when
# "dead-beef" is registered, and of folding a copy of the text (the broker's secrets, built
# once, are matched as they are)
FOLD = bytes.maketrans(b"ABCDEF-_", b"abcdef+/")
_URL_SAFE = bytes.maketrans(b"+/", b"-_")
LEFT, RIGHT = 1, 2  # mask the base64 character just before / after a match as well
B64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_")

_SHELL_UNSAFE = re.compile(r"([^\w@%+=:,./-])")
_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]*")
_PRINTF_Q_SPECIAL = re.compile(rb"[ \t\n'\"\\|&;()<>!{}*[?\]^$`,]|^#")
_PRINTF_Q_TILDE = re.compile(rb"(^|[=:])~")
_ANSI_C = {b"\a": b"\\a", b"\b": b"\\b", b"\t": b"\\t", b"\n": b"\\n", b"\v": b"\\v",
           b"\f": b"\\f", b"\r": b"\\r", b"\x1b": b"\\E", b"'": b"\\'", b"\\": b"\\\\"}
_ESCAPE = re.compile(rb"\\(x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|[0-7]{1,3}|.)", re.DOTALL)
_UNESCAPE = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"a": b"\a", b"b": b"\b", b"f": b"\f",
             b"v": b"\v", b"e": b"\x1b"}
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_ADD_MASK_ESCAPE = re.compile(rb"%(25|0[Dd]|0[Aa])")
_ADD_MASK_DECODED = {b"25": b"%", b"0d": b"\r", b"0a": b"\n"}


def decode_add_mask(raw: bytes) -> bytes:
    """The value of an ``::add-mask::`` line, GitHub Actions style: ``%25`` is ``%``, ``%0D`` and
    ``%0A`` (any case) are CR and LF, so that a multi-line value fits on one line."""
    return _ADD_MASK_ESCAPE.sub(lambda m: _ADD_MASK_DECODED[m.group(1).lower()], raw)


# --- the forms of a value -------------------------------------------------------------------

def _b64_forms(value: bytes) -> dict[bytes, int]:
    """Base64 of ``value``: padded, wrapped, and at each byte offset within a longer stream."""
    import base64  # (with shlex below: imported once a secret is registered, not at start-up)

    out: dict[bytes, int] = {}
    for k in range(3):
        text = base64.b64encode(b"\0" * k + value)
        lo, hi = 8 * k, 8 * (k + len(value))  # the value's bits in the stream
        # the characters made only of value bits; a character that mixes value bits with a
        # neighbour's depends on that neighbour, so it is masked by widening the match
        core = text[-(-lo // 6):hi // 6]
        out[core] = out.get(core, 0) | (LEFT if lo % 6 else 0) | (RIGHT if hi % 6 else 0)
        if k == 0:
            out.setdefault(text, 0)
            # the lines of a wrapped encoding, cut where the unwrapped encoding's pieces are
            # cut as well (lines wider than PIECE would otherwise cut differently, and a
            # leftmost-longest search could skip from one cutting to the other and leave a gap)
            cuts = sorted({len(text), *(i for width in (PIECE, *WRAP_COLUMNS)
                                        for i in range(0, len(text), width))})
            for a, b in itertools.pairwise(cuts):
                out.setdefault(text[a:b], 0)
            for i in range(0, len(text), PIECE):
                out.setdefault(text[i:i + PIECE], 0)
    return out


def _printf_q(value: bytes, utf8: bool) -> bytes:
    """What bash's ``printf %q`` prints for ``value`` (in a UTF-8 or in the C locale)."""
    if _PRINTABLE_ASCII.fullmatch(value) or (utf8 and _printable_utf8(value)):
        return _PRINTF_Q_TILDE.sub(rb"\1\\~", _PRINTF_Q_SPECIAL.sub(rb"\\\g<0>", value))
    if utf8:  # (the bytes of one character, whether it is printable)
        chars = [(bytes([ord(c) - 0xDC00]), False) if 0xDC80 <= ord(c) <= 0xDCFF else
                 (c.encode("utf-8", "surrogatepass"), c.isprintable())
                 for c in value.decode("utf-8", "surrogateescape")]
    else:
        chars = [(bytes([b]), 32 <= b < 127) for b in value]
    return b"$'" + b"".join(
        _ANSI_C.get(c) or (c if printable else b"".join(b"\\%03o" % b for b in c))
        for c, printable in chars) + b"'"


def _printable_utf8(value: bytes) -> bool:
    try:
        return value.decode("utf-8").isprintable()
    except UnicodeDecodeError:
        return False


def _xml_forms(text: str) -> set[str]:
    """XML/HTML escaping, with each common spelling of the quotes."""
    base = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return {base.replace('"', dq).replace("'", sq)
            for dq, sq in (('"', "'"), ("&quot;", "&apos;"), ("&quot;", "&#39;"),
                           ("&quot;", "&#x27;"), ("&#34;", "&#39;"))}


def _text_forms(value: bytes) -> set[bytes]:
    """The escaped and quoted spellings of ``value`` (URL, JSON, XML, SQL, shell)."""
    import shlex

    text = value.decode("utf-8", "surrogateescape")
    forms: set[str] = set()
    for safe in ("", "/"):
        url = quote(value, safe=safe)
        forms.update({url, quote_plus(value, safe=safe),
                      re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), url)})
    forms.add(json.dumps(text)[1:-1])
    forms.add(json.dumps(text, ensure_ascii=False)[1:-1])
    forms.add(_SHELL_UNSAFE.sub(r"\\\1", text))
    if "'" in text:  # otherwise shlex.quote only wraps the value, which is masked inside
        forms.add(shlex.quote(text))
        forms.add(text.replace("'", "''"))
    if any(c in text for c in "&<>\"'"):
        forms |= _xml_forms(text)
    out = {f.encode("utf-8", "surrogateescape") for f in forms}
    out.add(_printf_q(value, utf8=True))
    out.add(_printf_q(value, utf8=False))
    return out


def _unescape(value: bytes) -> bytes:
    """``value`` with backslash escapes (C, JSON, shell, ``$'...'``) replaced by what they mean."""
    def one(m: re.Match[bytes]) -> bytes:
        esc = m.group(1)
        if esc[:1] in b"xu" and len(esc) > 1:
            code = int(esc[1:], 16)
            return chr(code).encode("utf-8", "surrogatepass") if esc[:1] == b"u" else bytes([code])
        if esc[:1].isdigit() and esc[:1] in b"01234567":
            return bytes([int(esc, 8) & 0xFF])
        return _UNESCAPE.get(esc, esc)
    return _ESCAPE.sub(one, value)


def _bases(value: bytes) -> set[bytes]:
    """The value, without surrounding quotes, and unescaped: each is encoded in every way."""
    bases = {value}
    if len(value) >= 2 and value[:1] == value[-1:] and value[:1] in (b'"', b"'"):
        bases.add(value[1:-1])
    bases |= {_unescape(b) for b in bases if b"\\" in b}
    return bases


def _pieces(form: bytes) -> list[bytes]:
    """``form`` cut every :data:`PIECE` bytes from its start, the remainder joining the last
    piece (so pieces are PIECE to 2 * PIECE - 1 long): forms of a value that share a start
    (padded and unpadded base64, say) are cut at the same places, so a match of one always
    ends where a piece of the other begins."""
    n = len(form)
    if n <= PIECE:
        return [form]
    starts = list(range(0, n, PIECE))
    if n % PIECE:
        starts.pop()
    return [form[a:b] for a, b in zip(starts, [*starts[1:], n], strict=True)]


def patterns(value: bytes, fold: bool = False) -> dict[bytes, int]:
    """Every pattern for ``value``, with flags to widen a match over a partial base64 char;
    folded with :data:`FOLD` if ``fold`` (and then without upper-case hex and URL-safe base64,
    which fold to lower case and standard base64)."""
    forms: dict[bytes, int] = {}
    for base in _bases(value):
        hexed = base.hex().encode()
        for form in (base, hexed, *([] if fold else [hexed.upper()]), *_text_forms(base)):
            forms.setdefault(form, 0)
        for form, flags in _b64_forms(base).items():
            for spelling in [form] if fold else [form, form.translate(_URL_SAFE)]:
                forms[spelling] = forms.get(spelling, 0) | flags
    out: dict[bytes, int] = {}
    for form, flags in forms.items():
        lines = _LINE_BREAK.split(form)
        whole = [(form, flags)] if b"\n" not in form else []
        for text, fl in whole + ([(line, 0) for line in lines] if len(lines) > 1 else []):
            pieces = _pieces(text)
            for i, piece in enumerate(pieces):
                if len(piece) >= MIN_VARIANT:
                    pf = (fl & LEFT if i == 0 else 0) | (fl & RIGHT if i == len(pieces) - 1
                                                          else 0)
                    piece = piece.translate(FOLD) if fold else piece
                    out[piece] = out.get(piece, 0) | pf
    return out


def variants(value: bytes) -> set[bytes]:
    """Every pattern the masker looks for to find ``value`` (none contains a newline)."""
    return set(patterns(value))
