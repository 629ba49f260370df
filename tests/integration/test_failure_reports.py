"""Issue 8 item 9: a failure says what failed: the command and its line, which limit ended
the job, the step a cancel stopped (see test_lifecycle), no exit code that explains nothing."""

from __future__ import annotations

from typing import Any


def test_a_failed_step_names_its_command_and_line(run_job: Any) -> None:
    run = run_job("name: f\nsteps:\n  - name: build\n    run: |\n      echo one\n"
                  "      false || true\n      ls /nonexistent-dir\n      echo never\n")
    assert run.rc == 1 and run.result["exit_code"] == 2
    assert run.result["failed_at"] == "line 3: ls /nonexistent-dir"
    assert "step build failed with exit code 2 at line 3: ls /nonexistent-dir" in run.log
    assert "never" not in run.output("build")


def test_the_failed_command_is_the_jobs_text_cleaned(run_job: Any) -> None:
    run = run_job("name: f\nsteps:\n  - name: a\n    run: |\n"
                  "      echo '::add-mask::hidden-value-42'\n"
                  "      test hidden-value-42 = \"$(printf 'x\\033[2J')\"\n")
    assert run.rc == 1
    assert "hidden-value-42" not in run.log and "\x1b" not in run.log
    assert run.result["failed_at"].startswith("line 2: test ")


def test_a_job_timeout_is_told_from_a_step_timeout(run_job: Any) -> None:
    run = run_job("name: t\nresources: {timeout: 2s}\nsteps:\n  - {name: a, run: 'sleep 0.3'}\n"
                  "  - {name: b, run: 'sleep 30', timeout: 20s}\n")
    assert run.result["failure_reason"] == "timeout" and run.result["timeout"] == "job"
    assert "job timeout 2s reached during step b" in run.log
    assert "step b timed out" not in run.log
    run = run_job("name: t\nsteps:\n  - {name: b, run: 'sleep 30', timeout: 1s}\n")
    assert run.result["timeout"] == "step"
    assert "step b timed out after 1s" in run.log


def test_the_failure_trap_neither_blocks_nor_shifts_line_numbers(run_job: Any) -> None:
    run = run_job("name: f\nresources: {timeout: 60s}\nsteps:\n  - name: a\n    run: |\n"
                  "      set +e\n"
                  "      for i in $(seq 5000); do test -e /nonexistent; done\n"
                  "      echo \"at $LINENO [$BASH_ENV]\"\n      nosuchcommand\n")
    assert run.result["failure_reason"] == "script_failure", run.result
    assert run.result["duration_s"] < 30
    assert "at 3 []" in run.output("a")  # the script's own numbering; BASH_ENV is not inherited
    assert "line 4: nosuchcommand: command not found" in run.output("a")
    assert run.result["failed_at"] == "line 4: nosuchcommand"
