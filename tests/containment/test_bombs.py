"""Bombs: forks, memory, disk and output are bounded; the host and the runner survive."""

from __future__ import annotations

import sys

from tests.containment.conftest import job_processes

IMAGE_TOO = True  # these probes run in an image too (see conftest.py)


def written(log: str) -> list[int]:
    """The byte counts of dd's "N bytes (...) copied" lines."""
    return [int(line.split("| ", 1)[1].split()[0]) for line in log.splitlines()
            if "bytes" in line and "copied" in line]


def test_fork_bomb_hits_the_pids_limit(hostile) -> None:
    run = hostile("""
        set +e
        bomb() { bomb | bomb & }
        bomb
        sleep 3
        echo SURVIVED
    """, resources="resources: {pids: 64}\n", step="    timeout: 20s\n")
    assert "fork: retry: Resource temporarily unavailable" in run.log  # the pids limit bit
    assert run.elapsed < 60
    assert job_processes(run) == []


def test_python_fork_bomb_hits_the_pids_limit(hostile) -> None:
    run = hostile("""
        python3 - <<'PY'
        import os
        n = 0
        for _ in range(100000):
            try:
                if os.fork() == 0:
                    import time; time.sleep(30); os._exit(0)
                n += 1
            except OSError as e:
                print("FORK-REFUSED after", n, e)
                break
        PY
    """, resources="resources: {pids: 64}\n", step="    timeout: 20s\n")
    assert "FORK-REFUSED after" in run.log
    forks = int(run.log.split("FORK-REFUSED after")[1].split()[0])
    assert forks < 64


def test_memory_bomb_is_an_oom(hostile) -> None:
    run = hostile("""
        python3 -c '
        chunks = []
        while True:
            chunks.append(bytearray(16 * 1024 * 1024))
        '
    """, resources="resources: {memory: 128Mi}\n")
    assert run.result["failure_reason"] == "oom"


def test_tmp_disk_bomb_hits_the_tmp_limit(hostile) -> None:
    run = hostile("""
        dd if=/dev/zero of=/tmp/fill bs=1M count=1000 2>&1 | grep -e space -e copied || true
        echo DONE
    """, resources="resources: {tmp: 32Mi, memory: 512Mi}\n")
    assert "No space left on device" in run.log and "DONE" in run.log
    assert written(run.log) == [32 << 20]


def test_workspace_disk_bomb_hits_the_workspace_limit(hostile) -> None:
    run = hostile("""
        dd if=/dev/zero of=fill bs=1M count=1000 2>&1 | grep -e space -e copied || true
        dd if=/dev/zero of=/dev/shm/fill bs=1M count=1000 2>&1 | grep -e space -e copied || true
        echo DONE
    """, resources="resources: {workspace: 32Mi, memory: 512Mi}\n")
    assert run.log.count("No space left on device") == 2 and "DONE" in run.log
    assert written(run.log) == [32 << 20, 64 << 20]  # the workspace limit, then /dev/shm's


def test_inode_bomb_is_bounded(hostile) -> None:
    run = hostile("""
        python3 - <<'PY'
        import os
        n = 0
        try:
            while n < 3_000_000:
                open(f"/tmp/f{n}", "w").close()
                n += 1
        except OSError as e:
            print("STOPPED", n, e)
        PY
    """, resources="resources: {tmp: 16Mi, memory: 1Gi}\n", step="    timeout: 60s\n")
    assert "STOPPED" in run.log or run.result["failure_reason"] in ("oom", "timeout")


def test_output_bomb_is_capped_and_runner_memory_stays_bounded(hostile, monkeypatch,
                                                                 tmp_path) -> None:
    # the runner's own peak: measured by a fresh parent (this process's RUSAGE_CHILDREN holds
    # the largest child any earlier test of this worker waited for)
    import tests.conftest

    peak_file, wrapper = tmp_path / "peak_kib", tmp_path / "stockade-peak"
    wrapper.write_text(
        f"#!{sys.executable}\nimport os, resource, subprocess, sys\n"
        f"rc = subprocess.call([{tests.conftest.STOCKADE!r}, *sys.argv[1:]])\n"
        "open(os.environ['PEAK_FILE'], 'w').write(str(resource.getrusage("
        "resource.RUSAGE_CHILDREN).ru_maxrss))\nsys.exit(rc)\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(tests.conftest, "STOCKADE", str(wrapper))
    run = hostile("head -c 300000000 /dev/zero | tr '\\0' 'A'; seq 1 2000000",
                  STOCKADE_LOG_CAP=str(4 << 20), PEAK_FILE=str(peak_file))
    assert run.rc == 0
    assert run.result["log_truncated"] is True
    log_size = (run.home / "logs" / f"{run.result['job_id']}.log").stat().st_size
    assert 4 << 20 <= log_size < (4 << 20) + 4096
    assert "log truncated at 4194304 bytes" in run.log
    peak_kib = int(peak_file.read_text())
    assert 0 < peak_kib < 300 * 1024, f"runner peak RSS {peak_kib} KiB"


def test_limits_are_set_on_the_job_cgroup(run_job, stockade_home, tmp_path) -> None:
    import json
    import subprocess
    from pathlib import Path

    from tests.conftest import STOCKADE, cli_env, run_cli

    spec = tmp_path / "limits.yaml"
    spec.write_text("name: limits\nresources: {cpus: 0.25, memory: 96Mi, pids: 48}\n"
                    "steps:\n  - {name: a, run: 'echo started; sleep 3'}\n")
    proc = subprocess.Popen([STOCKADE, "run", str(spec), "--workspace", str(tmp_path)],
                            env=cli_env(stockade_home), stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "started" in line:
            break
    job = json.loads(run_cli(stockade_home, "jobs", "--json").stdout)[0]["job_id"]
    job = f"{(stockade_home / 'installation-id').read_text().strip()}-{job}"  # the cgroup's name
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        d = root / "stockade" / job
        got = {"memory": (d / "memory.max").read_text().strip(),
               "pids": (d / "pids.max").read_text().strip(),
               "cpu": (d / "cpu.max").read_text().split()[0]}
    else:
        got = {"memory": (root / "memory/stockade" / job / "memory.limit_in_bytes").read_text(),
               "memsw": (root / "memory/stockade" / job /
                         "memory.memsw.limit_in_bytes").read_text().strip(),
               "pids": (root / "pids/stockade" / job / "pids.max").read_text().strip(),
               "cpu": (root / "cpu/stockade" / job / "cpu.cfs_quota_us").read_text().strip()}
        assert got.pop("memsw") == str(96 << 20)
    proc.wait(timeout=30)
    assert {k: v.strip() for k, v in got.items()} == {
        "memory": str(96 << 20), "pids": "48", "cpu": "25000"}
