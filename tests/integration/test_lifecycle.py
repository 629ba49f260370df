"""A runner that is stopped or killed mid-job: the job is accounted for, nothing is left."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import STOCKADE, cli_env, job_cgroups, job_dir, run_cli

SLOW = "name: slow\nsteps:\n  - {name: a, run: 'echo started; sleep 300'}\n"


def start(home: Path, tmp_path: Path) -> subprocess.Popen[str]:
    spec = tmp_path / "slow.yaml"
    spec.write_text(SLOW)
    proc = subprocess.Popen([STOCKADE, "run", str(spec), "--workspace", str(tmp_path), "--json"],
                            env=cli_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "started" in line:
            return proc
    raise AssertionError(f"the job never started: {proc.wait()}")


def nothing_left(home: Path, job_id: str) -> None:
    assert not job_cgroups(home, job_id)
    assert not job_dir(home, job_id).exists()
    assert job_id not in Path("/proc/self/mountinfo").read_text()


def test_sigterm_cancels_and_tears_down(stockade_home: Path, tmp_path: Path) -> None:
    proc = start(stockade_home, tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    result = json.loads(out)
    assert proc.returncode == 1
    assert (result["status"], result["failure_reason"]) == ("failed", "canceled")
    assert result["steps"][-1]["name"] == "a" and result["steps"][-1]["status"] == "canceled"
    log = (stockade_home / "logs" / f"{result['job_id']}.log").read_text()
    assert "canceled by the user during step a" in log
    nothing_left(stockade_home, result["job_id"])


def test_killed_runner_is_reaped_by_the_next_run(stockade_home: Path, tmp_path: Path) -> None:
    proc = start(stockade_home, tmp_path)
    jobs = json.loads(run_cli(stockade_home, "jobs", "--json").stdout)
    lost_id = next(j["job_id"] for j in jobs if j["status"] == "running")
    assert job_dir(stockade_home, lost_id).exists()
    proc.kill()
    proc.wait()
    time.sleep(0.2)
    assert job_dir(stockade_home, lost_id).exists()  # SIGKILL: nobody could clean up
    spec = tmp_path / "next.yaml"
    spec.write_text("name: next\nsteps:\n  - {name: a, run: 'true'}\n")
    nxt = run_cli(stockade_home, "run", str(spec), "--workspace", str(tmp_path))
    assert nxt.returncode == 0
    assert f"job {lost_id} lost its runner" in nxt.stderr
    logged = run_cli(stockade_home, "logs", lost_id).stdout  # what it printed is kept
    assert "| started" in logged and "==> step a" in logged
    nothing_left(stockade_home, lost_id)
    shown = json.loads(run_cli(stockade_home, "show", lost_id, "--json").stdout)
    assert (shown["status"], shown["failure_reason"]) == ("failed", "runner_lost")
    audit = run_cli(stockade_home, "show", lost_id).stdout
    assert "job.runner_lost" in audit


def test_stockade_cancel_stops_a_local_run_within_a_heartbeat(stockade_home: Path,
                                                               tmp_path: Path) -> None:
    """``stockade cancel`` from another terminal stops a ``stockade run`` in progress (it
    said "cancel requested" and the job ran on to its end)."""
    proc = start(stockade_home, tmp_path)
    jobs = json.loads(run_cli(stockade_home, "jobs", "--json").stdout)
    job_id = next(j["job_id"] for j in jobs if j["status"] == "running")
    asked = time.monotonic()
    done = run_cli(stockade_home, "cancel", job_id)
    assert done.returncode == 0 and "cancel requested" in done.stdout, done.stderr
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - asked < 30  # a heartbeat is 2 s; the step sleeps 300
    result = json.loads(out)
    assert proc.returncode == 1
    assert (result["status"], result["failure_reason"]) == ("failed", "canceled")
    log = (stockade_home / "logs" / f"{job_id}.log").read_text()
    assert "canceled on request (stockade cancel) during step a" in log
    nothing_left(stockade_home, job_id)
