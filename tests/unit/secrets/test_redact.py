"""Masking: every value and encoding is masked, whatever the value and however output is cut."""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import re
import shlex
import subprocess
import time
from urllib.parse import quote, quote_plus
from xml.sax.saxutils import escape as xml_escape

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stockade.secrets import redact
from stockade.secrets.redact import (
    MASK,
    MAX_JOB_MASK_BYTES,
    MAX_JOB_MASKS,
    Masker,
    Redactor,
    decode_add_mask,
    variants,
)

# multi-line values are masked line by line, so each of their lines must be maskable itself
secret_values = st.binary(min_size=4, max_size=64).filter(
    lambda v: all(len(line) >= 4 for line in re.split(rb"\r\n|\r|\n", v)))
text_secrets = st.text(min_size=4, max_size=40).map(str.encode).filter(lambda v: len(v) >= 4)
filler = st.binary(max_size=200)


def encodings(value: bytes) -> list[bytes]:
    text = value.decode("utf-8", errors="surrogateescape")
    forms = [value, base64.b64encode(value), base64.urlsafe_b64encode(value),
             base64.b64encode(value).rstrip(b"="), value.hex().encode(),
             value.hex().upper().encode(), quote(value).encode(), quote(value, safe="").encode(),
             re.sub(rb"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(value).encode())]
    with contextlib.suppress(UnicodeEncodeError):
        forms += [quote_plus(text, safe="").encode(), json.dumps(text)[1:-1].encode(),
                  shlex.quote(text).encode(), html.escape(text).encode(),
                  xml_escape(text).encode(), text.replace("'", "''").encode()]
    return [f for f in forms if len(f) >= 4]


def stream(masker: Masker, data: bytes, cuts: list[int]) -> bytes:
    redactor = Redactor(masker)
    out, pos = [], 0
    for cut in [*sorted(set(c % (len(data) + 1) for c in cuts)), len(data)]:
        out.append(redactor.feed(data[pos:cut]))
        pos = cut
    return b"".join(out) + redactor.flush()


def printf_q(value: bytes, locale: str) -> bytes:
    """What bash itself prints for ``printf %q VALUE``."""
    return subprocess.run(["bash", "-c", 'printf %q "$1"', "-", value], check=True,
                          capture_output=True, env={"LC_ALL": locale, "PATH": os.defpath}).stdout


def rss_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=secret_values, before=filler, after=filler, pick=st.integers(0, 20),
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


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=secret_values, prefix=st.binary(min_size=1, max_size=8),
       suffix=st.binary(max_size=8), url=st.booleans())
def test_every_base64_character_holding_value_bits_is_masked(
        value: bytes, prefix: bytes, suffix: bytes, url: bool) -> None:
    # every offset (len(prefix) % 3), including the characters at either end that mix bits of
    # the value with bits of its neighbours, and the last one before the padding
    encoded = (base64.urlsafe_b64encode if url else base64.b64encode)(prefix + value + suffix)
    first = 8 * len(prefix) // 6  # the first character holding a bit of the value
    last = -(-8 * (len(prefix) + len(value)) // 6)  # one past the last such character
    core = encoded[-(-8 * len(prefix) // 6):8 * (len(prefix) + len(value)) // 6]
    assume(encoded.find(core) == -(-8 * len(prefix) // 6))  # not also found earlier (b"AAAA")
    regions = Masker([value]).spans(b"x " + encoded + b" y")
    assert any(s <= 2 + first and 2 + last <= e for s, e in regions), (regions, first, last)


@pytest.mark.parametrize("offset", [0, 1, 2])  # where the value starts in a 3-byte group
@pytest.mark.parametrize("bits", [2, 4])  # how many value bits the last character holds
@pytest.mark.parametrize("url", [False, True])
def test_partial_base64_characters_at_either_end_are_masked(offset: int, bits: int,
                                                            url: bool) -> None:
    prefix = b"\xfb" * (3 + offset)
    length = next(n for n in range(20, 23) if 8 * (len(prefix) + n) % 6 == bits)
    value = b"partial-base64-secret!"[:length]
    encode = base64.urlsafe_b64encode if url else base64.b64encode
    first = 8 * len(prefix) // 6  # the first character holding value bits
    last = -(-8 * (len(prefix) + length) // 6)  # one past the last one
    for neighbour in (b"\x00", b"\xff", b"\x5a"):
        encoded = encode(prefix + value + neighbour * 3)
        assert Masker([value]).mask(encoded) == encoded[:first] + MASK + encoded[last:]


@settings(max_examples=300)
@given(values=st.lists(secret_values, min_size=1, max_size=5),
       job_values=st.lists(secret_values, max_size=4), data=st.binary(max_size=400),
       cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_streaming_equals_masking_the_whole(values: list[bytes], job_values: list[bytes],
                                           data: bytes, cuts: list[int]) -> None:
    masker = Masker(values)
    for value in job_values:  # automata of their own: matches of several automata merge
        masker.add_job_mask(value)
    assert stream(masker, data, cuts) == masker.mask(data)


@settings(max_examples=200)
@given(values=st.lists(secret_values, min_size=1, max_size=3), data=st.binary(max_size=300),
       cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_streaming_equals_masking_the_whole_with_values_inside(
        values: list[bytes], data: bytes, cuts: list[int]) -> None:
    masker = Masker(values[:1])
    for value in values[1:]:
        masker.add_job_mask(value)
    text = data[:100] + values[0] + data[100:200] + values[-1] + base64.b64encode(values[-1])
    assert stream(masker, text, cuts) == masker.mask(text)
    assert values[0] not in masker.mask(text)


@given(value=secret_values, data=filler)
def test_text_without_secrets_passes_unchanged(value: bytes, data: bytes) -> None:
    assume(not any(v in data for v in variants(value)))
    assert stream(Masker([value]), data, [7, 31]) == data


def test_complete_lines_are_emitted_at_once() -> None:
    redactor = Redactor(Masker([b"a-rather-long-secret-value" * 10]))
    assert redactor.feed(b"first line\nsecond") == b"first line\n"


def test_wrapped_base64_of_a_long_secret_is_masked() -> None:
    value = bytes(range(256)) * 2
    for wrapped in (base64.encodebytes(value),  # 76-column lines, like base64(1)
                    re.sub(rb"(.{64})", rb"\1\n", base64.b64encode(value))):  # PEM
        masked = Masker([value]).mask(wrapped)
        assert set(masked.split(b"\n")) <= {b"***", b""}


def test_a_long_secret_is_masked_in_one_piece_even_truncated() -> None:
    value = os.urandom(3000)
    masker = Masker([value])
    assert masker.mask(b"<" + value.hex().encode() + b">") == b"<***>"
    truncated = masker.mask(value.hex().encode()[:1000])  # cut off by a log line limit, say
    assert len(truncated) < 130 and truncated.startswith(MASK)


def test_each_line_of_a_multiline_secret_is_masked() -> None:
    masker = Masker([b"first-line-secret\nsecond-line-secret"])
    assert masker.mask(b"a second-line-secret b") == b"a *** b"


@pytest.mark.parametrize("separator", [b"\n", b"\r\n", b"\r"])
def test_lines_split_on_any_line_break_are_masked(separator: bytes) -> None:
    masker = Masker([b"first-line-secret" + separator + b"second-line-secret"])
    for printed in (b"second-line-secret", b"first-line-secret\r", b"x\rfirst-line-secret"):
        assert b"line-secret" not in masker.mask(printed)
    assert masker.mask(b"first-line-secret\r\nsecond-line-secret\n") == b"***\r\n***\n"


@pytest.mark.parametrize("printed", [
    b"p&lt;a&gt;ss&amp;&quot;w&apos;rd!",  # XML (.NET SecurityElement.Escape)
    b"p&lt;a&gt;ss&amp;&quot;w&#x27;rd!",  # html.escape
    b"p&lt;a&gt;ss&amp;&#34;w&#39;rd!",  # markupsafe, Go html/template
    b"p&lt;a&gt;ss&amp;\"w'rd!",  # XML text content (saxutils.escape)
])
def test_xml_and_html_escaped_values_are_masked(printed: bytes) -> None:
    assert Masker([b"p<a>ss&\"w'rd!"]).mask(b"<v>" + printed + b"</v>") == b"<v>***</v>"


def test_doubled_single_quotes_are_masked() -> None:
    masker = Masker([b"it's-a-secret"])
    assert masker.mask(b"SELECT 'it''s-a-secret'") == b"SELECT '***'"
    assert masker.mask(b"key: 'it''s-a-secret'\n") == b"key: '***'\n"


@pytest.mark.parametrize("quote_char", [b'"', b"'"])
def test_a_value_registered_with_quotes_is_masked_without_them(quote_char: bytes) -> None:
    masker = Masker([quote_char + b"quoted-secret-value" + quote_char])
    assert masker.mask(b"token=quoted-secret-value;") == b"token=***;"
    assert masker.mask(base64.b64encode(b"quoted-secret-value")) == MASK


@pytest.mark.parametrize(("registered", "printed"), [
    (rb"line-one\nline-two", b"line-one\nline-two"),
    (rb"tab\tseparated-secret", b"tab\tseparated-secret"),
    (rb"say \"hi\" secretly", b'say "hi" secretly'),
    (rb"C:\\secret\\path", rb"C:\secret\path"),
    (rb"caf\u00e9-secret", "café-secret".encode()),
])
def test_the_unescaped_form_of_an_escaped_value_is_masked(registered: bytes,
                                                          printed: bytes) -> None:
    masked = Masker([registered]).mask(b"> " + printed + b"\n")
    assert set(re.split(rb"\r?\n", masked)) <= {b"> ***", b"***", b""}, masked


def test_python_default_url_quoting_is_masked() -> None:
    value = b"p@ss/w:rd?secret&more"
    printed = quote(value).encode()  # keeps "/"
    assert b"/" in printed
    assert Masker([value]).mask(b"https://h.test/?t=" + printed) == b"https://h.test/?t=***"


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
@pytest.mark.parametrize("value", [b"a,b,c-secret", b"sec ret$with`specials'\"!", b"~tilde#x",
                                   b"multi\nline\tsecret", "caf\u00e9,secret".encode(),
                                   b"esc\x1b[0m-secret"])
def test_bash_printf_q_is_masked(value: bytes, locale: str) -> None:
    printed = printf_q(value, locale)
    assert Masker([value]).mask(b"+ run " + printed + b" x") == b"+ run *** x", printed


def test_decode_add_mask_follows_the_github_actions_escapes() -> None:
    assert decode_add_mask(b"line-one%0Aline-two%0D%0aend") == b"line-one\nline-two\r\nend"
    assert decode_add_mask(b"100%25-sure") == b"100%-sure"
    assert decode_add_mask(b"%250A stays %0A") == b"%0A stays \n"  # decoded once
    assert decode_add_mask(b"%41%2F") == b"%41%2F"


def test_a_multiline_job_mask_is_masked_line_by_line() -> None:
    masker = Masker()
    assert masker.add_job_mask(decode_add_mask(b"first-derived%0Asecond-derived")) is None
    assert masker.mask(b"x second-derived y\nfirst-derived\n") == b"x *** y\n***\n"


def test_job_masks_are_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    masker = Masker()
    assert masker.add_job_mask(b"abc") is not None  # too short to mask anything
    big = b"B" * (MAX_JOB_MASK_BYTES + 1)
    reason = masker.add_job_mask(big)
    assert reason is not None and "BBBB" not in reason
    for i in range(MAX_JOB_MASKS):
        assert masker.add_job_mask(b"derived-%04d" % i) is None
    assert masker.add_job_mask(b"derived-0007") is None  # already there: not counted
    reason = masker.add_job_mask(b"one-too-many")
    assert reason is not None and "one-too-many" not in reason
    assert masker.job_masks == MAX_JOB_MASKS
    assert masker.mask(b"derived-0255") == MASK
    assert masker.mask(b"one-too-many") == b"one-too-many"

    monkeypatch.setattr(redact, "MAX_JOB_MASK_TOTAL", 10_000)
    masker = Masker()
    for i in range(2):
        assert masker.add_job_mask(b"%d" % i * 4096) is None
    assert masker.add_job_mask(b"2" * 2000) is not None  # 10,192 bytes in all
    assert masker.add_job_mask(b"2" * 1800) is None


def test_broker_values_are_not_limited() -> None:
    masker = Masker()
    masker.add(b"K" * 64 * 1024, name="BIG")
    assert masker.names_in(b"K" * 70_000) == {"BIG"}


def test_registering_long_repetitive_values_is_linear() -> None:
    started = time.perf_counter()
    baseline = Masker([os.urandom(700).hex().encode() for _ in range(10)])
    baseline.mask(b"x")  # automata are built when first needed
    small = time.perf_counter() - started
    before = rss_mib()

    started = time.perf_counter()
    repetitive = Masker([b"_" * 16384])
    assert repetitive.mask(b"a " + b"_" * 16384 + b" b") == b"a *** b"
    assert time.perf_counter() - started < max(5 * small, 1.0)

    started = time.perf_counter()
    large = Masker()
    values = [os.urandom(7000).hex().encode() for _ in range(10)]  # 10 x 14 kB
    for value in values:
        large.add(value)
    assert large.mask(values[3]) == MASK
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0 and elapsed < 30 * small + 1.0, (elapsed, small)  # 10x the bytes
    assert rss_mib() - before < 150  # the quadratic version took ~750 MiB
    assert max(len(v) for v in variants(values[0])) < 128


def test_job_registrations_keep_few_automata() -> None:
    masker = Masker([b"a-broker-secret"])
    for i in range(200):
        assert masker.add_job_mask(b"job-value-%04d-" % i + os.urandom(20).hex().encode()) is None
        masker.mask(b"x")  # one registration at a time, each followed by output
    assert len(masker._current().segments) <= 1 + 2 * 7


def test_near_matches_cost_a_bounded_amount_per_byte() -> None:
    # "aaaa" matches every 4 bytes, and after each match a leftmost-longest search looks for
    # the long value as far as it is long: with whole values that was 1,000 times the work
    data = b"a" * 1_000_000

    def cost(masker: Masker) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            redactor = Redactor(masker)
            for pos in range(0, len(data), 65536):
                redactor.feed(data[pos:pos + 65536])
            redactor.flush()
            best = min(best, time.perf_counter() - started)
        return best

    plain = Masker([b"aaaa"])
    near = Masker([b"aaaa", b"a" * 4095 + b"c"])
    job = Masker([b"aaaa"])
    job.add_job_mask(b"a" * 4095 + b"c")
    assert near.mask(b"aaaaaa") == MASK + b"aa"
    assert cost(near) < 10 * cost(plain)
    assert cost(job) < 10 * cost(plain)


def test_a_long_line_in_small_chunks_costs_linear_time() -> None:
    # what was held back (up to the longest encoding of the value: 128 KiB of hex for a
    # 64 KiB secret) was searched again with every chunk of an unfinished line
    masker = Masker([os.urandom(64 * 1024)])  # the longest a broker secret may be
    masker.mask(b"x")
    data = b"y" * 4_000_000  # one line that never ends

    def cost(chunk: int) -> float:
        started = time.perf_counter()
        redactor = Redactor(masker)
        for pos in range(0, len(data), chunk):
            redactor.feed(data[pos:pos + chunk])
            assert len(redactor._buf) <= masker.longest + 2
        redactor.flush()
        return time.perf_counter() - started

    assert cost(1024) < 10 * cost(65536) + 0.1


def test_holdback_is_bounded() -> None:
    masker = Masker([b"x" * 100])
    redactor = Redactor(masker)
    for _ in range(1000):
        redactor.feed(b"y" * 4096)
        assert len(redactor._buf) <= masker.longest + 2


def test_masker_can_grow_mid_stream() -> None:
    masker = Masker([b"known-secret"])
    redactor = Redactor(masker)
    first = redactor.feed(b"known-secret derived-value ")
    masker.add(b"derived-value")
    rest = redactor.feed(b"and derived-value again") + redactor.flush()
    assert b"known-secret" not in first + rest
    assert rest.endswith(b"*** again")


def test_job_masks_take_effect_mid_stream() -> None:
    masker = Masker([b"known-secret"])
    redactor = Redactor(masker)
    first = redactor.feed(b"known-secret job-derived ")
    assert masker.add_job_mask(b"job-derived") is None
    rest = redactor.feed(b"and job-derived again") + redactor.flush()
    assert b"known-secret" not in first + rest
    assert rest.endswith(b"*** again")


def test_a_busy_job_automaton_becomes_a_dfa_and_masks_the_same() -> None:
    def masker() -> Masker:
        m = Masker([b"broker-secret"])
        assert m.add_job_mask(b"job-derived-value") is None
        return m

    data = (b"x job-derived-value y broker-secret z\n" + b"filler " * 100 + b"\n") * 2000
    expected = masker().mask(data)  # searched once: still the NFA
    busy = masker()
    nfa = busy._current().segments[-1]
    assert not nfa.dfa
    assert stream(busy, data, list(range(0, len(data), 4099))) == expected  # upgraded midway
    dfa = busy._current().segments[-1]
    assert dfa.dfa and dfa.key == nfa.key
    assert stream(busy, data, [1000, 50_000]) == expected


def test_busy_job_automata_become_one_dfa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redact, "_DFA_AFTER", 16)  # a DFA pays off sooner: a shorter test
    masker = Masker([b"broker-secret"])
    values = [b"job-value-%02d-" % i + os.urandom(300).hex().encode() for i in range(8)]
    for value in values:
        assert masker.add_job_mask(value) is None
        masker.mask(b"x")
    assert len(masker._current().segments) > 2
    data = b"".join(b"line " + v + b" broker-secret\n" + b"filler " * 500 + b"\n"
                    for v in values) * 40
    out = stream(masker, data, list(range(0, len(data), 65536)))
    assert [seg.dfa for seg in masker._current().segments] == [True, True]
    for text in (out, stream(masker, data, [1000])):
        assert not any(v in text for v in values) and b"broker-secret" not in text


def test_registering_after_a_dfa_does_not_rebuild_it_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redact, "_DFA_AFTER", 16)
    masker = Masker()
    for i in range(2):  # a DFA over 16 KiB: later values get automata of their own
        masker.add_job_mask(b"early-%d-" % i + os.urandom(1000).hex().encode())
        masker.mask(b"x")
    for _ in range(2):  # the NFAs search, become one DFA, which searches a lot in turn
        stream(masker, b"filler line\n" * 200_000, [])
    assert [seg.dfa for seg in masker._current().segments] == [True]
    builds = []
    real_build = redact._Segment.build.__func__  # type: ignore[attr-defined]

    def counting(cls: type[redact._Segment], table: dict[bytes, tuple[str, int]], fold: bool,
                 dfa: bool) -> redact._Segment:
        builds.append(dfa)
        return real_build(cls, table, fold, dfa)  # type: ignore[no-any-return]

    monkeypatch.setattr(redact._Segment, "build", classmethod(counting))
    for i in range(20):  # each followed by a little output: no DFA is worth building yet
        masker.add_job_mask(b"late-%02d-" % i + os.urandom(10).hex().encode())
        masker.mask(b"some output\n" * 10)
    assert True not in builds
