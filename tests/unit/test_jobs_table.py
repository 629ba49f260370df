"""The jobs table (cli/commands/jobs.py): its name column is as wide as the longest name (at
most NAME_WIDTH, longer ones cut with "…"), so that the columns after it line up."""

from __future__ import annotations

import pytest

from stockade.cli.commands.jobs import NAME_WIDTH, print_jobs


def _row(job_id: str, name: str) -> dict[str, object]:
    return {"job_id": job_id, "name": name, "status": "succeeded", "failure_reason": None,
            "created_at": 1.0e9, "started_at": 1.0e9, "finished_at": 1.0e9 + 2.5}


def test_the_columns_line_up_whatever_the_names(capsys: pytest.CaptureFixture[str]) -> None:
    long = "x" * (NAME_WIDTH + 30)
    print_jobs([_row("j1", "calc-build-and-test-in-image"), _row("j2", "a"),
                _row("j3", long), _row("j4", "bad\x1b[2Jname")], as_json=False)
    lines = capsys.readouterr().out.splitlines()
    status_at = {line.index("succeeded") for line in lines[1:]}
    assert len(status_at) == 1 and lines[0].index("STATUS") in status_at, lines
    assert "x" * (NAME_WIDTH - 1) + "…" in lines[3] and long not in lines[3]
    assert "\x1b" not in "".join(lines)
