"""Issue 8 item 4: a full file system under STOCKADE_HOME ends the job as an error with its
JSON result; the partial artifacts are removed and the log cut to its start, the database stays
intact, and the next job runs once there is space again."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli

LOUD = "name: loud\nsteps:\n  - {name: a, run: 'yes 0123456789abcdef | head -c 40000000'}\n"
BULKY = ("name: bulky\nartifacts: [out/*]\nresources: {workspace: 64Mi, memory: 256Mi}\n"
         "steps:\n  - {name: a, run: 'mkdir out; head -c 30000000 /dev/urandom > out/big'}\n")
QUIET = "name: quiet\nsteps:\n  - {name: a, run: 'echo still here'}\n"


@pytest.fixture
def small_home(tmp_path: Path) -> Iterator[Path]:
    """A state directory on a 20 MiB file system of its own."""
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount / "home"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def run(home: Path, tmp_path: Path, spec: str) -> tuple[int, dict[str, object], str]:
    path = tmp_path / "job.yaml"
    path.write_text(spec)
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    proc = run_cli(home, "run", str(path), "--workspace", str(ws), "--json", timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else {}, proc.stderr


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize(("spec", "removed"), [(LOUD, "logs"), (BULKY, "artifacts")],
                         ids=["log", "artifact"])
def test_a_full_file_system_ends_the_job_cleanly(small_home: Path, tmp_path: Path,
                                                  spec: str, removed: str) -> None:
    rc, result, _ = run(small_home, tmp_path, QUIET)
    assert rc == 0, result
    free_before = free_bytes(small_home)
    rc, result, stderr = run(small_home, tmp_path, spec)
    assert rc == 4, stderr
    assert (result["status"], result["failure_reason"]) == ("error", "system_error"), result
    assert "No space left on device" in str(result.get("error")), result
    job_id = str(result["job_id"])
    if removed == "logs":  # cut to its start, which tells what ran, and why it ends there
        log = small_home / "logs" / f"{job_id}.log"
        assert log.stat().st_size < 70 * 1024
        assert "log cut here: the file system is full" in log.read_text()
        assert result["steps"] == [{"name": "a", "status": "error", "exit_code": None,
                                    "duration_s": result["steps"][0]["duration_s"]}]
    else:  # a partial set of artifacts is no use
        assert not (small_home / "artifacts" / job_id).exists()
    assert free_bytes(small_home) > free_before - (1 << 20)  # the space is back
    shown = json.loads(run_cli(small_home, "show", job_id, "--json").stdout)
    assert shown["status"] == "error"  # the database is intact
    assert run_cli(small_home, "audit", "verify").returncode == 0
    rc, result, stderr = run(small_home, tmp_path, QUIET)
    assert rc == 0, stderr
