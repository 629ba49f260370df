"""Masking: every value and encoding is masked, whatever the value and however output is cut."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shlex
from urllib.parse import quote, quote_plus

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stockade.secrets.redact import MASK, Masker, Redactor, variants

# multi-line values are masked line by line, so each of their lines must be maskable itself
secret_values = st.binary(min_size=4, max_size=64).filter(
    lambda v: all(len(line) >= 4 for line in re.split(rb"\r?\n", v)))
text_secrets = st.text(min_size=4, max_size=40).map(str.encode).filter(lambda v: len(v) >= 4)
filler = st.binary(max_size=200)


def encodings(value: bytes) -> list[bytes]:
    text = value.decode("utf-8", errors="surrogateescape")
    forms = [value, base64.b64encode(value), base64.urlsafe_b64encode(value),
             base64.b64encode(value).rstrip(b"="), value.hex().encode(),
             value.hex().upper().encode()]
    with contextlib.suppress(UnicodeEncodeError):
        forms += [quote(text, safe="").encode(), quote_plus(text, safe="").encode(),
                  json.dumps(text)[1:-1].encode(), shlex.quote(text).encode()]
    return [f for f in forms if len(f) >= 4]


def stream(masker: Masker, data: bytes, cuts: list[int]) -> bytes:
    redactor = Redactor(masker)
    out, pos = [], 0
    for cut in [*sorted(set(c % (len(data) + 1) for c in cuts)), len(data)]:
        out.append(redactor.feed(data[pos:cut]))
        pos = cut
    return b"".join(out) + redactor.flush()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=secret_values, before=filler, after=filler, pick=st.integers(0, 9),
       cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_every_encoding_is_masked_however_the_stream_is_cut(
        value: bytes, before: bytes, after: bytes, pick: int, cuts: list[int]) -> None:
    form = encodings(value)[pick % len(encodings(value))]
    out = stream(Masker([value]), before + form + after, cuts)
    assert form not in out
    assert MASK in out


@settings(max_examples=200)
@given(value=text_secrets, prefix=st.binary(min_size=0, max_size=2), after=filler)
def test_base64_of_a_value_inside_a_longer_stream_is_masked(
        value: bytes, prefix: bytes, after: bytes) -> None:
    encoded = base64.b64encode(prefix + value + after)
    masked = Masker([value]).mask(b"data: " + encoded)
    decoded_parts = masked.split(MASK)
    assert len(decoded_parts) >= 2, (value, prefix, encoded)


@settings(max_examples=300)
@given(values=st.lists(secret_values, min_size=1, max_size=5), data=st.binary(max_size=400),
       cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_streaming_equals_masking_the_whole(values: list[bytes], data: bytes,
                                           cuts: list[int]) -> None:
    masker = Masker(values)
    assert stream(masker, data, cuts) == masker.mask(data)


@given(value=secret_values, data=filler)
def test_text_without_secrets_passes_unchanged(value: bytes, data: bytes) -> None:
    assume(not any(v in data for v in variants(value)))
    assert stream(Masker([value]), data, [7, 31]) == data


def test_complete_lines_are_emitted_at_once() -> None:
    redactor = Redactor(Masker([b"a-rather-long-secret-value" * 10]))
    assert redactor.feed(b"first line\nsecond") == b"first line\n"


def test_wrapped_base64_of_a_long_secret_is_masked() -> None:
    value = bytes(range(256)) * 2
    wrapped = base64.encodebytes(value)  # 76-column lines, like base64(1)
    masked = Masker([value]).mask(wrapped)
    assert set(masked.split(b"\n")) == {b"***", b""}


def test_each_line_of_a_multiline_secret_is_masked() -> None:
    masker = Masker([b"first-line-secret\nsecond-line-secret"])
    assert masker.mask(b"a second-line-secret b") == b"a *** b"


def test_holdback_is_bounded() -> None:
    masker = Masker([b"x" * 100])
    redactor = Redactor(masker)
    for _ in range(1000):
        redactor.feed(b"y" * 4096)
        assert len(redactor._pending) < masker.longest


def test_masker_can_grow_mid_stream() -> None:
    masker = Masker([b"known-secret"])
    redactor = Redactor(masker)
    first = redactor.feed(b"known-secret derived-value ")
    masker.add(b"derived-value")
    rest = redactor.feed(b"and derived-value again") + redactor.flush()
    assert b"known-secret" not in first + rest
    assert rest.endswith(b"*** again")
