"""Nothing persists between jobs; nothing of the runner leaks in; artifacts never leak out."""

from __future__ import annotations

from pathlib import Path

IMAGE_TOO = True  # these probes run in an image too (see conftest.py)


def test_nothing_persists_between_jobs(hostile) -> None:
    hostile("""
        echo planted > /tmp/planted; echo planted > /workspace/planted
        echo planted > /dev/shm/planted
        mkdir -p /tmp/.cache && echo planted > /tmp/.cache/x
    """)
    run = hostile("""
        for p in /tmp/planted /workspace/planted /dev/shm/planted /tmp/.cache/x; do
          test -e $p && echo FOUND $p
        done
        echo DONE
    """)
    assert "DONE" in run.log and "FOUND" not in run.log


def test_runner_environment_does_not_leak(hostile) -> None:
    run = hostile("env; cat /proc/1/environ | tr '\\0' '\\n'; echo DONE",
                  AWS_SECRET_ACCESS_KEY="leaky-aws-key", GITHUB_TOKEN="leaky-gh-token",
                  STOCKADE_LOG_CAP="12345678", SSH_AUTH_SOCK="/tmp/leaky.sock")
    assert "DONE" in run.log
    for leak in ("leaky-aws-key", "leaky-gh-token", "12345678", "leaky.sock", "STOCKADE_HOME"):
        assert leak not in run.log


def test_artifact_symlink_to_a_host_file_is_refused(hostile, host) -> None:
    run = hostile('mkdir -p dist; ln -s "$CANARY" dist/canary; ln -s /etc/shadow dist/shadow; '
                  "ln -s / dist/root; echo ok > dist/real.txt",
                  extra="artifacts: ['dist/**']\n")
    assert run.rc == 0
    assert [a["path"] for a in run.result["artifacts"]] == ["dist/real.txt"]
    refused = " ".join(run.result["artifacts_refused"])
    assert "dist/canary" in refused and "dist/root" in refused


def test_artifact_special_files_do_not_hang_collection(hostile) -> None:
    run = hostile("mkdir -p out; mkfifo out/fifo; python3 -c \"import socket; "
                  "socket.socket(socket.AF_UNIX).bind('out/sock')\"; echo x > out/x",
                  extra="artifacts: ['out/**']\n")
    assert run.rc == 0 and [a["path"] for a in run.result["artifacts"]] == ["out/x"]
    assert run.elapsed < 30


def test_artifact_globs_cannot_climb_out(run_job, tmp_path: Path) -> None:
    run = run_job("name: climb\nartifacts: ['../**']\nsteps:\n  - {name: a, run: 'true'}\n")
    assert run.rc == 2


def test_hostile_artifact_trees_do_not_break_collection(hostile) -> None:
    run = hostile("""
        mkdir -p out && cd out && echo ok > plain.txt
        python3 - <<'PY'
        import os
        open(b"bad-\\xff-name", "w").close()
        os.makedirs("deep", exist_ok=True)
        os.chdir("deep")
        for _ in range(3000):  # deeper than Python's recursion limit
            os.mkdir("d")
            os.chdir("d")
        open("bottom.txt", "w").write("deep")
        PY
    """, extra="artifacts: ['out/**']\n")
    assert run.rc == 0, run.result
    paths = [a["path"] for a in run.result["artifacts"]]
    assert "out/plain.txt" in paths
    refused = " ".join(run.result.get("artifacts_refused", []))
    assert "not valid UTF-8" in refused
