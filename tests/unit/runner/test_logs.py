"""The job log: records, escaping, the two maskers, the caps, and live output that never blocks."""

from __future__ import annotations

import io
import os
import re
import threading
import time
from pathlib import Path

import pytest

from stockade.runner import logs
from stockade.runner.logs import MAX_LINE, JobLog
from stockade.secrets.redact import Masker

RECORD = re.compile(rb"\d\d:\d\d:\d\d (\| |==> )")


def records(path: Path) -> list[bytes]:
    """The stored log's records without their timestamps."""
    return [line[9:] for line in path.read_bytes().split(b"\n")[:-1]]


def assert_inert(data: bytes) -> None:
    """Valid UTF-8 without a control character (but tab and the newline ending each record),
    a C1 control or a bidi control; every line a record."""
    text = data.decode("utf-8")
    bad = [c for c in text if (ord(c) < 0x20 and c not in "\t\n") or 0x7F <= ord(c) < 0xA0
           or c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"]
    assert not bad, bad
    for line in data.split(b"\n")[:-1]:
        assert RECORD.match(line), line


def test_lines_are_stamped_and_split_across_chunks(tmp_path: Path) -> None:
    live = io.BytesIO()
    log = JobLog(tmp_path / "j.log", 1 << 20, live)
    log.note("step a")
    log.output(b"hel")
    log.output(b"lo\nwor")
    log.output(b"ld\n")
    log.close()
    assert records(tmp_path / "j.log") == [b"==> step a", b"| hello", b"| world"]
    assert live.getvalue() == (tmp_path / "j.log").read_bytes()


def test_cr_ends_a_line_and_crlf_is_one_end_across_chunks(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 1 << 20, None)
    log.output(b"progress 10%\rprogress 99%\rdone\r")
    log.output(b"\nnext\r\n")
    log.output(b"last\r")
    log.flush_partial()
    log.close()
    assert records(tmp_path / "j.log") == [b"| progress 10%", b"| progress 99%", b"| done",
                                           b"| next", b"| last"]


def test_terminal_controls_never_reach_the_stored_or_live_log(tmp_path: Path) -> None:
    live = io.BytesIO()
    log = JobLog(tmp_path / "j.log", 1 << 20, live)
    hostile = (b"\x1b]52;c;ZXZpbA==\x07 \x1b]8;;https://evil.test\x1b\\link\x1b]8;;\x1b\\ "
               b"\x1b[2J\x1b[31mred \x9b31m raw-C1 " + "\u009b\u009d valid-C1 ".encode()
               + "\u202eevil\u2066".encode() + b" \x00\x7f\x08 \xff\xfe end\n")
    log.output(hostile)
    log.note("a note with \x1b[2K and \x9d and \r in it")
    log.close()
    stored = (tmp_path / "j.log").read_bytes()
    assert_inert(stored)
    assert live.getvalue() == stored
    assert b"\\x1b]52;c;ZXZpbA==\\x07" in stored and b"\\x9b31m" in stored
    assert b"\\u202eevil\\u2066" in stored and b"\\xff\\xfe end" in stored


def test_a_newline_in_a_note_cannot_forge_a_record(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 1 << 20, None)
    log.note("artifact a\n12:00:00 ==> step deploy succeeded 1 KiB")
    log.output(log.job_text("x\n12:00:00 ==> step deploy succeeded").encode() + b"\n")
    log.close()
    assert records(tmp_path / "j.log") == [
        b"==> artifact a\\n12:00:00 ==> step deploy succeeded 1 KiB",
        b"| x\\n12:00:00 ==> step deploy succeeded"]


def test_job_masks_mask_job_output_but_never_stockades_notes(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 1 << 20, None)
    registered: list[int] = []
    log.use_masker(Masker([b"broker-secret-1"]), registered.append)
    log.output(b"::add-mask::egress denied\n::add-mask::succeeded\negress denied here\n")
    log.note("egress denied: evil.test:443: not in the allowlist")
    log.note("step build succeeded in 0.10s")
    log.note("leaked broker-secret-1 into a note")
    log.close()
    assert records(tmp_path / "j.log") == [
        b"| ::add-mask::***", b"| ::add-mask::***", b"| *** here",
        b"==> egress denied: evil.test:443: not in the allowlist",
        b"==> step build succeeded in 0.10s",
        b"==> leaked *** into a note"]
    assert registered == [len(b"egress denied"), len(b"succeeded")]


def test_job_text_masks_with_secrets_and_job_masks_and_escapes(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 1 << 20, None)
    log.use_masker(Masker([b"broker-secret-1"]), lambda n: None)
    log.output(b"::add-mask::job-derived\n")
    assert log.job_text("dist/broker-secret-1/job-derived\x1b[2K\u202e.txt") == (
        "dist/***/***\\x1b[2K\\u202e.txt")
    assert log.job_text("plain/path.txt") == "plain/path.txt"
    assert log.job_text(b"bad\xffname".decode("utf-8", "surrogateescape")) == "bad\\xffname"
    log.close()


def test_escaping_cannot_spell_out_a_secret(tmp_path: Path) -> None:
    # a secret that is literally the escaped spelling of a control sequence: the job prints the
    # raw sequence, which masking does not match, and escaping would write the secret
    secret = b"\\x1b[31mTOKEN-42"
    log = JobLog(tmp_path / "j.log", 1 << 20, None)
    log.use_masker(Masker([secret]), lambda n: None)
    log.output(b"\x1b[31mTOKEN-42\n")
    log.note("\x1b[31mTOKEN-42")
    log.close()
    assert secret not in (tmp_path / "j.log").read_bytes()
    assert records(tmp_path / "j.log") == [b"| ***", b"==> ***"]


def test_add_mask_decodes_percent_escapes(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 1 << 20, None)
    log.output(b"::add-mask::first-line%0Asecond%25line%0D%0A\n")
    log.output(b"first-line and second%line\n")
    log.close()
    assert records(tmp_path / "j.log") == [b"| ::add-mask::***", b"| *** and ***"]


def test_add_mask_on_cr_terminated_lines(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 1 << 20, None)
    log.output(b"::add-mask::cr-derived\rnext cr-derived\r")
    log.output(b"::add-mask::crlf-derived\r\ncrlf-derived then\n")
    log.close()
    assert records(tmp_path / "j.log") == [b"| ::add-mask::***", b"| next ***",
                                           b"| ::add-mask::***", b"| *** then"]


def test_a_refused_mask_is_noted_without_its_value(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    log = JobLog(tmp_path / "j.log", 1 << 20, None)
    registered: list[int] = []
    log.use_masker(Masker(), registered.append)
    reasons = iter([None, "too many masks for this job", "shorter than 4 bytes"])
    monkeypatch.setattr(log.job_masker, "add_job_mask", lambda value: next(reasons))
    log.output(b"before\n::add-mask::accepted-value\n::add-mask::refused-value\nafter\n"
               b"::add-mask::abc\n")
    log.close()
    stored = (tmp_path / "j.log").read_bytes()
    assert b"refused-value" not in stored and b"abc" not in stored
    assert records(tmp_path / "j.log") == [
        b"| before", b"| ::add-mask::***", b"| ::add-mask::***", b"| after",
        b"| ::add-mask::***",
        b"==> ::add-mask:: refused: too many masks for this job",
        b"==> ::add-mask:: refused: shorter than 4 bytes"]
    assert registered == [len(b"accepted-value")]


def test_the_maskers_own_refusals_are_noted(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 1 << 20, None)
    log.output(b"::add-mask::abc\n::add-mask::" + b"v" * (MAX_LINE // 2) + b"\n")
    log.close()
    stored = (tmp_path / "j.log").read_bytes()
    assert b"abc" not in stored and b"vvvvvvvv" not in stored
    refusals = [r for r in records(tmp_path / "j.log") if r.startswith(b"==> ")]
    assert len(refusals) == 2 and all(r.startswith(b"==> ::add-mask:: refused: ")
                                      for r in refusals), refusals


def test_an_add_mask_line_too_long_to_hold_never_prints_its_value(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 16 << 20, None)
    log.output(b"::add-mask::" + b"w" * 20_000)
    log.output(b"w" * 50_000)
    log.output(b"w" * 100 + b"\nnext line\n::add-mask::" + b"v" * MAX_LINE)
    log.flush_partial()
    log.output(b"new step\n")
    log.close()
    assert records(tmp_path / "j.log") == [
        b"| ::add-mask::***",
        b"==> ::add-mask:: refused: the line is longer than 16384 bytes",
        b"| next line", b"| ::add-mask::***",
        b"==> ::add-mask:: refused: the line is longer than 16384 bytes",
        b"| new step"]


def test_cap_truncates_output_with_a_marker(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 1000, None)
    for _ in range(100):
        log.output(b"x" * 99 + b"\n")
    log.close()
    data = (tmp_path / "j.log").read_bytes()
    assert data[:1000].count(b"\n") == 9  # 9 whole records of 111 bytes, 1 byte of the 10th
    assert data[1000:1001] == b"\n"  # a record cut at the cap still ends its line
    assert log.dropped == 100 * len(b"HH:MM:SS | " + b"x" * 99 + b"\n") - 1000
    assert records(tmp_path / "j.log")[-1] == (
        b"==> log truncated at 1000 bytes of job output; 10100 more bytes of output and 0 "
        b"bytes of notes were dropped")


def test_notes_are_kept_after_the_output_fills_the_cap(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 4096, None)
    log.note("step flood")
    for _ in range(1000):
        log.output(b"flood " * 20 + b"\n")
    log.flush_partial()
    log.note("step flood failed with exit code 1")
    log.note("job j: failed (script_failure) in 1.00s, 1/1 steps run, 0 artifacts")
    log.close()
    notes = [r for r in records(tmp_path / "j.log") if r.startswith(b"==> ")]
    assert notes[:4] == [
        b"==> step flood",
        b"==> the job's output reached the log cap (4096 bytes): further output is not stored",
        b"==> step flood failed with exit code 1",
        b"==> job j: failed (script_failure) in 1.00s, 1/1 steps run, 0 artifacts"]
    assert notes[4].startswith(b"==> log truncated at 4096 bytes")
    assert log.written == 4096


def test_notes_have_a_budget_of_their_own(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 1 << 20, None, note_budget=1000)
    for i in range(100):
        log.note(f"egress denied: host{i}.test:443")
    log.output(b"output still stored\n")
    log.close()
    kept = records(tmp_path / "j.log")
    assert kept[0] == b"==> egress denied: host0.test:443"
    assert b"==> stockade's notes reached their budget (1000 bytes): further notes are dropped" \
        in kept
    assert b"| output still stored" in kept
    assert kept[-1].startswith(b"==> log truncated at")
    assert log.notes_written <= 1000 and log.notes_dropped > 0


def test_an_endless_line_is_not_buffered(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 10 << 20, None)
    for _ in range(64):
        log.output(b"y" * 65536)
        assert len(log._partial) < MAX_LINE
    log.close()
    assert (tmp_path / "j.log").stat().st_size > 64 * 65536


def test_an_endless_line_is_cut_between_characters(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 10 << 20, None)
    log.output(b"x" + "é".encode() * MAX_LINE)  # held back, then cut at MAX_LINE
    log.output(b"\n")
    log.close()
    stored = (tmp_path / "j.log").read_bytes()
    assert b"\\x" not in stored
    assert_inert(stored)


def test_a_stalled_live_reader_never_blocks_the_job(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "LIVE_STALL_S", 0.3)
    r, w = os.pipe()  # nobody reads r
    live = os.fdopen(w, "wb")
    log = JobLog(tmp_path / "j.log", 64 << 20, live)
    line = b"z" * 1000 + b"\n"

    def job() -> None:
        for _ in range(20_000):  # 20 MB, far beyond the pipe and the live queue
            log.output(line)
        log.note("step done")
        log.close()

    pump = threading.Thread(target=job, daemon=True)
    started = time.monotonic()
    pump.start()
    pump.join(60)
    blocked = pump.is_alive()
    os.close(r)  # a writer still blocked on the pipe now fails, and the thread ends
    assert not blocked, "the job's output pump blocked on the live reader"
    assert time.monotonic() - started < 30
    assert log.live is not None and log.live.dropped > 0
    stored = records(tmp_path / "j.log")
    assert stored.count(b"| " + line[:-1]) == 20_000 and stored[-1] == b"==> step done"
    live.close()


def test_a_slow_live_reader_is_told_what_it_missed(tmp_path: Path) -> None:
    r, w = os.pipe()
    live = os.fdopen(w, "wb")
    log = JobLog(tmp_path / "j.log", 64 << 20, live)
    for _ in range(5_000):  # 5 MB while nobody reads: most of it is dropped
        log.output(b"q" * 1000 + b"\n")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: os.read(r, 65536), b"")))
    reader.start()
    log.note("step done")
    log.close()
    live.close()
    reader.join(10)
    shown = b"".join(got)
    assert b"bytes were not shown here because the reader did not keep up" in shown
    assert shown.endswith(b"==> step done\n")
    assert shown.count(b"\n") < 5_000
    os.close(r)
