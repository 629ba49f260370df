"""The workspace copy as a user meets it through ``stockade run``: .stockadeignore and --exclude,
the copy note in the job's log, and an oversized workspace refused as a usage error."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.conftest import JobRun, run_cli

LIST = ("name: ws\nsteps:\n  - name: list\n    run: |\n"
        "      find . -mindepth 1 \\( -type f -o -type l \\) | sort\n"
        "      stat -c '%n %a %Y %U' run.sh\n      readlink hosts\n")


def run(home: Path, tmp_path: Path, spec: str, ws: Path, *extra: str) -> JobRun:
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(spec)
    proc = run_cli(home, "run", str(spec_path), "--workspace", str(ws), "--json", *extra,
                   timeout=120)
    lines = proc.stdout.splitlines()
    result = json.loads(lines[-1]) if lines else {}
    return JobRun(proc.returncode, result, proc.stdout, proc.stderr, home)


def make(root: Path, files: dict[str, bytes]) -> Path:
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return root


def test_excludes_leave_paths_out_and_the_log_counts_the_copy(stockade_home: Path,
                                                              tmp_path: Path) -> None:
    ws = make(tmp_path / "ws", {
        ".stockadeignore": b"# not needed in CI\n.venv/\n*.pyc\n",
        ".venv/lib/site.py": b"x" * 50_000, "src/a.py": b"print(1)\n", "src/a.pyc": b"\0" * 99,
        "build/out.o": b"\0" * 10, "run.sh": b"#!/bin/sh\n",
    })
    for i in range(300):  # a directory that is excluded is not walked: it counts once
        (ws / ".venv" / "lib" / f"m{i}.py").write_text("")
    os.chmod(ws / "run.sh", 0o4755)  # the setuid bit is never copied
    os.utime(ws / "run.sh", (1_600_000_000, 1_600_000_000))  # times are (make needs them)
    (ws / "hosts").symlink_to("/etc/hosts")  # copied as a link, never followed
    os.mkfifo(ws / "pipe")  # skipped: opening it would hang the copy
    job = run(stockade_home, tmp_path, LIST, ws, "--exclude", "build/")
    assert job.rc == 0, job.stderr
    assert job.output("list").splitlines() == [
        "./.stockadeignore", "./hosts", "./run.sh", "./src/a.py",
        "run.sh 755 1600000000 ci", "/etc/hosts"]
    assert ("==> workspace: copied 4 files (61 B), excluded 3 (.venv/, build/, src/a.pyc)"
            in job.log)
    assert sorted(p.name for p in ws.iterdir()) == [  # the user's directory is untouched
        ".stockadeignore", ".venv", "build", "hosts", "pipe", "run.sh", "src"]


def test_oversized_workspace_is_a_usage_error_before_the_job_runs(stockade_home: Path,
                                                                 tmp_path: Path) -> None:
    ws = make(tmp_path / "ws", {"data/big.bin": b"\0" * (3 << 20), "src/a.py": b"print(1)\n"})
    spec = "name: big\nresources: {workspace: 1Mi}\nsteps:\n  - {name: a, run: 'true'}\n"
    started = time.monotonic()
    job = run(stockade_home, tmp_path, spec, ws)
    assert (job.rc, job.stdout) == (2, "")  # refused like a bad spec: nothing was run
    assert f"workspace {ws} is 3.0 MiB in 2 files; the job allows 1.0 MiB " \
           "(resources.workspace)\nlargest: data/ 3.0 MiB, src/ 9 B\n" in job.stderr
    assert "hint: raise resources.workspace in the job spec (this runner allows at most " \
           "8.0 GiB), or exclude files with .stockadeignore" in job.stderr
    assert "--exclude PATTERN" in job.stderr and "Traceback" not in job.stderr
    assert time.monotonic() - started < 10
    fits = run(stockade_home, tmp_path, spec, ws, "--exclude", "data/")
    assert (fits.rc, fits.result["status"]) == (0, "succeeded"), fits.stderr
    assert "copied 1 file (9 B), excluded 1 (data/)" in fits.log


def test_the_size_check_counts_what_the_tmpfs_holds(stockade_home: Path,
                                                    tmp_path: Path) -> None:
    """A file takes whole 4 KiB pages and an inode: 300 one-byte files do not fit into 1 MiB,
    100 do."""
    spec = "name: pages\nresources: {workspace: 1Mi}\nsteps:\n  - {name: a, run: 'true'}\n"
    ws = make(tmp_path / "ws", {f"f{i:03}": b"x" for i in range(300)})
    job = run(stockade_home, tmp_path, spec, ws)
    assert job.rc == 2, job.stderr
    assert "is 300 B (1.5 MiB in the sandbox: 4 KiB pages, 1 KiB an entry) in 300 files" \
        in job.stderr
    job = run(stockade_home, tmp_path, spec, ws, "--exclude", "f[12]*")
    assert (job.rc, job.result["status"]) == (0, "succeeded"), job.stderr
    assert "copied 100 files (100 B), excluded 200" in job.log


def test_a_bad_ignore_file_is_a_usage_error_and_never_hangs(stockade_home: Path,
                                                             tmp_path: Path) -> None:
    spec = "name: bad\nsteps:\n  - {name: a, run: 'true'}\n"
    ws = tmp_path / "ws"
    ws.mkdir()
    os.mkfifo(ws / ".stockadeignore")
    job = run(stockade_home, tmp_path, spec, ws)
    assert job.rc == 2 and ".stockadeignore is not a regular file" in job.stderr
    os.unlink(ws / ".stockadeignore")
    (ws / ".stockadeignore").write_text("ok/\n*a*a*a*a*a*a*a*a*b\n")
    job = run(stockade_home, tmp_path, spec, ws)
    assert job.rc == 2 and "line 2: '*a*a*a*a*a*a*a*a*b' is too complex" in job.stderr
    (ws / ".stockadeignore").write_text("ok/\n")
    job = run(stockade_home, tmp_path, spec, ws, "--exclude", "foo\\")
    assert job.rc == 2 and "--exclude 'foo\\' is not a valid gitignore pattern" in job.stderr
