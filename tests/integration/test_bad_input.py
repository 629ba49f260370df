"""Issue 8 item 5: bad input to any command never hangs, crashes or floods: exit 2 within
seconds, a few lines naming the problem and the fix, the input echoed only as an excerpt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import run_cli


def refused(proc_stderr: str, rc: int, named: str) -> None:
    assert rc == 2, proc_stderr
    assert "Traceback" not in proc_stderr
    assert named in proc_stderr, proc_stderr
    assert len(proc_stderr) < 600 and len(proc_stderr.splitlines()) <= 4, proc_stderr


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("source", ["/dev/zero", "fifo", "big"])
def test_a_secret_value_from_a_device_fifo_or_huge_file_is_refused(
        stockade_home: Path, tmp_path: Path, fifo: Path, source: str) -> None:
    path = {"/dev/zero": Path("/dev/zero"), "fifo": fifo, "big": tmp_path / "big"}[source]
    if source == "big":
        path.write_bytes(b"x" * (64 * 1024 + 1))
    proc = run_cli(stockade_home, "secret", "set", "BAD_INPUT", "--from-file", str(path),
                   timeout=10)
    refused(proc.stderr, proc.returncode, str(path))


@pytest.mark.parametrize("command", ["show", "logs", "audit list --job"])
def test_a_huge_job_id_is_not_a_job(stockade_home: Path, command: str) -> None:
    proc = run_cli(stockade_home, *command.split(), "j" * 100_000, timeout=10)
    refused(proc.stderr, proc.returncode, "is not a job id")


@pytest.mark.parametrize("limit", ["0", "-1", "9223372036854775808", "1e3"])
def test_jobs_limit_must_be_a_count(stockade_home: Path, limit: str) -> None:
    proc = run_cli(stockade_home, "jobs", "--limit", limit, timeout=10)
    refused(proc.stderr, proc.returncode, "is not a count")


@pytest.mark.parametrize(("content", "named"), [
    (b"log_cap_bytes = -1\n", "log_cap_bytes"),
    (b"log_cap_bytes = inf\n", "log_cap_bytes"),
    (b"max_cpus = inf\n", "max_cpus"),
    (b"max_cpus = nan\n", "max_cpus"),
    (b"log_cap_bytes = 1e400\n", "log_cap_bytes"),
    (b"max_timeout_s = -1.0\n", "max_timeout_s"),
    (b"log_cap_bytes = " + b"9" * 5000 + b"\n", "a number in it has too many digits"),
    (b'oidc_issuer = "\xff"\n', "cannot read settings"),
    (b"max_pids = [1, 2]\n", "max_pids"),
    (b'egress_internal_allow = ["127.0.0.1:8765"]\n', "egress_internal_allow: '127.0.0.1:8765'"),
])
def test_bad_settings_files_are_named(stockade_home: Path, tmp_path: Path, content: bytes,
                                      named: str) -> None:
    config = tmp_path / "config.toml"
    config.write_bytes(content)
    proc = run_cli(stockade_home, "jobs", STOCKADE_CONFIG=str(config), timeout=10)
    refused(proc.stderr, proc.returncode, named)


def test_a_settings_fifo_never_hangs(stockade_home: Path, fifo: Path) -> None:
    proc = run_cli(stockade_home, "jobs", STOCKADE_CONFIG=str(fifo), timeout=10)
    refused(proc.stderr, proc.returncode, "not a regular file")


def test_a_misspelt_variable_is_named_not_silently_ignored(stockade_home: Path) -> None:
    proc = run_cli(stockade_home, "jobs", STOCKADE_MAX_MEMROY="1Gi", timeout=10)
    assert proc.returncode == 0
    assert "STOCKADE_MAX_MEMROY is not a stockade setting and is ignored; did you mean " \
        "STOCKADE_MAX_MEMORY?" in proc.stderr
