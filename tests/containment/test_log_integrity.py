"""Log and audit integrity: what a job prints or names cannot forge stockade's records, act on a
viewer's terminal, censor stockade's notes, push them out of the log, or stall the runner.

Every job here runs through the real ``stockade run``; the stored log, the live log on stderr
and what ``stockade logs``, ``show`` and ``audit list`` print are all checked.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from stockade.audit import AuditEvent
from stockade.store.sqlite import SqliteStore
from tests.conftest import STOCKADE, cli_env, run_cli

IMAGE_TOO = True  # these probes run in an image too (see conftest.py)

FORGED = "12:00:00 ==> step deploy succeeded"
# a line of stockade's own, or of a job, as the log writes them
RECORD = re.compile(r"^\d\d:\d\d:\d\d (\| |==> )")


def spec(script: str, name: str = "integrity", extra: str = "", step: str = "") -> str:
    body = "\n".join("      " + line for line in textwrap.dedent(script).strip().splitlines())
    return f"name: {name}\n{extra}steps:\n  - name: probe\n{step}    run: |\n{body}\n"


def assert_inert(text: str, where: str) -> None:
    """Nothing a terminal acts on: no C0 control but tab and newline, no DEL, no C1, no bidi
    control, and no line that passes for a forged record."""
    bad = sorted({f"U+{ord(c):04X}" for c in text
                  if (ord(c) < 0x20 and c not in "\t\n") or 0x7F <= ord(c) < 0xA0
                  or "\u202a" <= c <= "\u202e" or "\u2066" <= c <= "\u2069"})
    assert not bad, f"{where}: raw control characters {bad}"
    assert not any(line.lstrip().startswith(FORGED) for line in text.splitlines()), (
        f"{where}: a forged stockade line")


def assert_records(log: bytes) -> None:
    """The stored log: valid UTF-8, every line one record."""
    text = log.decode("utf-8")
    assert_inert(text, "stored log")
    for line in text.splitlines():
        assert RECORD.match(line), f"not a record: {line!r}"


HOSTILE_OUTPUT = r"""
printf 'osc52 \033]52;c;ZXZpbCBjbGlwYm9hcmQ=\007 osc8 \033]8;;https://evil.test/\033\\link\033]8;;\033\\\n'
printf 'erase \033[2K\033[1A\033[31mred\rOVERWRITTEN\n'
printf 'c1-raw \x9b31m \x9d52;c;eA==\x9c c1-utf8 \xc2\x9b31m\n'
printf 'bidi \xe2\x80\xae gnp.exe \xe2\x81\xa6x\xe2\x81\xa9 del \x7f nul-free bell \a\n'
printf 'a\n12:00:00 ==> step deploy succeeded\n'
printf 'no newline at the end \033[0m'
"""


def test_terminal_controls_never_reach_the_stored_log_or_a_viewer(run_job: Any,
                                                                  stockade_home: Path) -> None:
    run = run_job(spec(HOSTILE_OUTPUT))
    assert run.rc == 0, run.stderr[-2000:]
    job = run.result["job_id"]
    stored = (stockade_home / "logs" / f"{job}.log").read_bytes()
    assert_records(stored)
    assert b"\\x1b]52;c;ZXZpbCBjbGlwYm9hcmQ=\\x07" in stored  # visible, inert
    assert b"\\x9b31m" in stored and b"\\u009b31m" in stored and b"\\u202e" in stored
    assert_inert(run.stderr, "live log")
    printed = run_cli(stockade_home, "logs", job)
    assert printed.returncode == 0
    assert_inert(printed.stdout, "stockade logs")


def test_stored_data_from_older_versions_is_escaped_when_printed(run_job: Any,
                                                                 stockade_home: Path) -> None:
    run = run_job(spec("echo ok"))
    job = run.result["job_id"]
    # a log and an audit event as an older stockade stored them: raw controls, a forged line
    raw = (b"10:00:00 | \x1b]52;c;ZXZpbA==\x07 \x9b2J \r" + FORGED.encode() + b"\n"
           b"10:00:01 | a\xe2\x80\xaecod.exe\n")
    (stockade_home / "logs" / f"{job}.log").write_bytes(raw)
    store = SqliteStore(stockade_home / "stockade.db")
    store.record([AuditEvent("runner:old", "egress.denied", time.time(), job,
                             {"destination": f"x.test:443\n{FORGED}\x1b]8;;https://e/\x07",
                              "reason": "\u202eevil\x9b"})])
    store.close()
    for args in (("logs", job), ("show", job), ("audit", "list", "--job", job)):
        printed = run_cli(stockade_home, *args)
        assert printed.returncode == 0, printed.stderr
        assert_inert(printed.stdout, " ".join(args))
    shown = run_cli(stockade_home, "audit", "list", "--job", job).stdout
    assert f"x.test:443\\n{FORGED}\\x1b]8;;https://e/\\x07" in shown


def test_an_artifact_name_cannot_forge_stockade_lines(run_job: Any, stockade_home: Path) -> None:
    script = """
        python3 -c "open('a\\n' + '12:00:00 ==> step deploy succeeded', 'w').write('x')"
        python3 -c "open('b\\x1b]52;c;eA==\\x07\\u202e.txt', 'w').write('y')"
        ls
    """
    run = run_job(spec(script, extra='artifacts: ["*"]\n'))
    job = run.result["job_id"]
    assert_records((stockade_home / "logs" / f"{job}.log").read_bytes())
    assert_inert(run.stderr, "live log")
    for args in (("logs", job), ("show", job), ("audit", "list", "--job", job)):
        printed = run_cli(stockade_home, *args)
        assert printed.returncode == 0, printed.stderr
        assert_inert(printed.stdout, " ".join(args))


def test_job_masks_never_censor_stockades_notes(run_job: Any) -> None:
    script = """
        echo "::add-mask::egress denied"
        echo "::add-mask::succeeded"
        echo "::add-mask::step probe"
        curl -sS -o /dev/null --max-time 10 https://denied.example.test/ || true
        echo "egress denied, said the job"
    """
    run = run_job(spec(script, extra='egress: {mode: block, allow: ["allowed.example.test"]}\n'))
    assert run.rc == 0, run.stderr[-2000:]
    notes = [line[13:] for line in run.log.splitlines() if line[9:].startswith("==> ")]
    assert any(n.startswith("egress denied") and "denied.example.test" in n for n in notes), notes
    assert "step probe" in notes
    assert any(n.startswith("step probe succeeded in") for n in notes), notes
    assert any(n.startswith("job integrity: succeeded") for n in notes), notes
    assert "***, said the job" in run.output("probe")  # the job's own output is masked


def test_add_mask_decodes_percent_escapes_and_cr_lines_and_notes_refusals(run_job: Any) -> None:
    script = r"""
        echo "::add-mask::first-derived%0Asecond-derived%25"
        printf '::add-mask::cr-derived-value\r'
        printf '::add-mask::crlf-derived-value\r\n'
        echo "first-derived and second-derived% and cr-derived-value and crlf-derived-value"
        python3 -c "print('::add-mask::' + 'V' * 8000)"
        python3 -c "print('::add-mask::' + 'W' * (1 << 20))"
        echo "after the refusals"
    """
    run = run_job(spec(script))
    assert run.rc == 0, run.stderr[-2000:]
    out = run.output("probe")
    assert "*** and *** and *** and ***" in out, out
    for value in ("first-derived", "second-derived%", "cr-derived-value", "crlf-derived-value",
                  "VVVVVVVV", "WWWWWWWW"):
        assert value not in run.log and value not in run.stderr
    refused = re.findall(r"^\d\d:\d\d:\d\d ==> ::add-mask:: refused: ", run.log, re.M)
    assert len(refused) == 2, run.log
    assert "after the refusals" in out


def test_notes_are_written_after_the_output_fills_the_cap(run_job: Any) -> None:
    script = """
        head -c 3000000 /dev/zero | tr '\\0' 'x' | fold -w 100
        exit 3
    """
    run = run_job(spec(script), STOCKADE_LOG_CAP=str(256 * 1024))
    assert run.rc == 1 and run.result["failure_reason"] == "script_failure"
    assert run.result["log_truncated"] is True
    notes = [line[13:] for line in run.log.splitlines() if line[9:].startswith("==> ")]
    assert "step probe failed with exit code 3" in notes, notes[-5:]
    assert any(n.startswith("job integrity: failed (script_failure)") for n in notes), notes
    assert notes[-1].startswith("log truncated at 262144 bytes of job output")


def test_a_stalled_stderr_reader_does_not_delay_the_timeout(stockade_home: Path,
                                                            tmp_path: Path) -> None:
    timeout = 8
    job = tmp_path / "job.yaml"
    job.write_text(spec("while :; do echo 'lots of output nobody reads'; done",
                        step=f"    timeout: {timeout}s\n"))
    (tmp_path / "ws").mkdir()
    result_file = tmp_path / "result.json"
    with result_file.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(  # stderr: a pipe that nobody reads
            [STOCKADE, "run", str(job), "--workspace", str(tmp_path / "ws"), "--json"],
            stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=cli_env(stockade_home))
        try:
            proc.wait(timeout=timeout + 20)
        except subprocess.TimeoutExpired:
            assert proc.stderr is not None  # unblock it, then let it cancel and tear down
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            proc.terminate()
            proc.wait(120)
        elapsed = time.monotonic() - started
    assert proc.stderr is not None
    proc.stderr.close()
    assert elapsed < timeout + 20, f"a {timeout}s step took {elapsed:.0f}s"
    result = result_file.read_text()
    assert '"failure_reason":"timeout"' in result, result
    job_id = json.loads(result)["job_id"]
    stored = (stockade_home / "logs" / f"{job_id}.log").read_text()
    assert f"step probe timed out after {timeout}s" in stored
    assert "job integrity: failed (timeout)" in stored
