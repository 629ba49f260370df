"""The job log: line stamping, the size cap and its marker, bounded partial lines."""

from __future__ import annotations

import io
from pathlib import Path

from stockade.runner.logs import MAX_LINE, JobLog


def test_lines_are_stamped_and_split_across_chunks(tmp_path: Path) -> None:
    live = io.BytesIO()
    log = JobLog(tmp_path / "j.log", 1 << 20, live)
    log.note("step a")
    log.output(b"hel")
    log.output(b"lo\nwor")
    log.output(b"ld\n")
    log.close()
    lines = (tmp_path / "j.log").read_bytes().splitlines()
    assert [line[9:] for line in lines] == [b"==> step a", b"| hello", b"| world"]
    assert live.getvalue() == (tmp_path / "j.log").read_bytes()


def test_cap_truncates_with_a_marker(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 1000, None)
    for _ in range(100):
        log.output(b"x" * 99 + b"\n")
    log.close()
    data = (tmp_path / "j.log").read_bytes()
    body, marker = data[:1000], data[1000:]
    assert len(body) == 1000
    assert b"log truncated at 1000 bytes" in marker
    assert log.dropped == 100 * len(b"HH:MM:SS | " + b"x" * 99 + b"\n") - 1000


def test_an_endless_line_is_not_buffered(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "j.log", 10 << 20, None)
    for _ in range(64):
        log.output(b"y" * 65536)
        assert len(log._partial) < MAX_LINE
    log.close()
    assert (tmp_path / "j.log").stat().st_size > 64 * 65536
