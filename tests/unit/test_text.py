"""Control-character escaping: nothing a terminal acts on survives, and it stays linear."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from stockade.text import escape_bytes, escape_controls, escape_lines

# what a terminal, a log viewer or a reader's eye must never receive raw
FORBIDDEN = ({chr(c) for c in range(0x20) if c != 0x09} | {chr(c) for c in range(0x7F, 0xA0)}
             | set("\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
                   "\u2066\u2067\u2068\u2069"))


def _clean(text: str) -> bool:
    return not (FORBIDDEN & set(text)) and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def test_terminal_sequences_are_spelled_out() -> None:
    osc52 = "\x1b]52;c;ZXZpbA==\x07"
    osc8 = "\x1b]8;;https://evil.test/\x1b\\click\x1b]8;;\x1b\\"
    assert escape_controls(osc52) == "\\x1b]52;c;ZXZpbA==\\x07"
    assert escape_controls(osc8) == ("\\x1b]8;;https://evil.test/\\x1b\\click"
                                     "\\x1b]8;;\\x1b\\")
    assert escape_controls("ok\rFAKE\x1b[2K\x7f") == "ok\\rFAKE\\x1b[2K\\x7f"
    assert escape_controls("a\n12:00:00 ==> step deploy succeeded") == (
        "a\\n12:00:00 ==> step deploy succeeded")


def test_c1_and_bidi_controls_are_spelled_out() -> None:
    assert escape_controls("\x9b31m\x9d52;c;x\x9c\x85") == "\\u009b31m\\u009d52;c;x\\u009c\\u0085"
    assert escape_controls("safe\u202etxt.exe\u2066\u2069\u2028") == (
        "safe\\u202etxt.exe\\u2066\\u2069\\u2028")


def test_tab_and_ordinary_text_are_kept() -> None:
    text = "tab\there: ünïcödé ✓ 日本語 C:\\path\\x1b (literal)"
    assert escape_controls(text) == text
    assert escape_bytes(text.encode()) == text.encode()


def test_invalid_utf8_bytes_are_spelled_as_hex() -> None:
    # raw C1 bytes (0x9b is CSI in an 8-bit terminal), a lone continuation byte, an overlong
    # ESC, an encoded surrogate, a truncated sequence
    data = b"a\x9b31m b\x80 c\xc0\x9b d\xed\xa0\x80 e\xe2\x82"
    assert escape_bytes(data) == (b"a\\x9b31m b\\x80 c\\xc0\\x9b d\\xed\\xa0\\x80 e\\xe2\\x82")
    # the C1 controls encoded validly in UTF-8 are code points, spelled as such
    assert escape_bytes("\x9b".encode()) == b"\\u009b"


def test_str_from_surrogateescape_gets_the_same_spelling() -> None:
    assert escape_controls(b"x\xff\x1b".decode("utf-8", "surrogateescape")) == "x\\xff\\x1b"
    assert escape_controls("lone \ud800") == "lone \\ud800"


@given(st.binary(max_size=300))
def test_any_bytes_come_out_clean_valid_utf8(data: bytes) -> None:
    out = escape_bytes(data)
    assert _clean(out.decode("utf-8"))  # strict: raises on invalid UTF-8


@given(st.text(max_size=300))
def test_any_text_comes_out_clean(text: str) -> None:
    out = escape_controls(text)
    assert _clean(out)
    out.encode()  # no surrogates left


@given(st.lists(st.binary(max_size=40), max_size=8))
def test_escape_lines_is_escape_bytes_of_each_line(lines: list[bytes]) -> None:
    lines = [line.replace(b"\n", b"") for line in lines]
    assert escape_lines(b"\n".join(lines)) == b"\n".join(escape_bytes(line) for line in lines)


@given(st.lists(st.one_of(st.binary(max_size=20), st.text(max_size=20).map(
    lambda t: t.encode("utf-8", "surrogatepass")), st.sampled_from(
    [chr(c).encode() for c in (0x1B, 0x85, 0x9B, 0x61C, 0x200F, 0x2028, 0x202E, 0x2066)])),
    max_size=10))
def test_the_byte_level_path_spells_like_the_reference(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    reference = escape_controls(data.decode("utf-8", "surrogateescape")).encode()
    assert escape_bytes(data) == reference


def test_time_is_linear() -> None:
    def cost(n: int) -> float:
        data = (b"\x1b[31m\x9b\xff\r" + "\u202e".encode() + b"x") * n
        started = time.perf_counter()
        escape_bytes(data)
        return time.perf_counter() - started

    cost(1000)
    small, large = min(cost(10_000) for _ in range(3)), min(cost(100_000) for _ in range(3))
    assert large < 30 * small  # 10x the input: linear is ~10x, quadratic would be ~100x
