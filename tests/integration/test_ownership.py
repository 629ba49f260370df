"""Issue 8 items 1 and 2: an installation's reaper touches only what is provably its own, and
every job ends in a final state at once, whatever dies when.

Runners are killed at chosen points by running the real CLI in a process that sends itself
SIGKILL when it reaches that point (``KILL_AT``); nothing of stockade is replaced."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import STOCKADE, cli_env, job_cgroups, job_dir, run_cli

SLOW = "name: slow\nsteps:\n  - {name: a, run: 'echo started; sleep 300'}\n"
TRIVIAL = "name: quick\nsteps:\n  - {name: a, run: 'true'}\n"
KEEPER = ("name: keeper\nsecrets: [OWN_TOKEN]\nartifacts: [out/*]\n"
          "steps:\n  - {name: a, run: 'mkdir -p out; head -c 4096 /dev/zero > out/blob'}\n")

# Run the CLI, but SIGKILL this process when it reaches ``target`` (module:Class.method),
# or, with a delay, sleep there first (a slow runner).
INJECT = """
import os, signal, sys, time, importlib
from stockade.cli.main import main
target, action = sys.argv[1], sys.argv[2]
module, attr = target.split(":")
cls_name, method = attr.split(".")
cls = getattr(importlib.import_module(module), cls_name)
original = getattr(cls, method)
def hooked(*args, **kwargs):
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "raise":
        from stockade.errors import StoreError
        raise StoreError("injected: the result could not be committed")
    time.sleep(float(action))
    return original(*args, **kwargs)
setattr(cls, method, hooked)
sys.exit(main(sys.argv[3:]))
"""

CLAIM = "stockade.control.service:ControlService.claim"
PREPARE = "stockade.sandbox.bwrap:BwrapBackend.prepare"
COMPLETE = "stockade.control.service:ControlService.complete"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_hooked(home: Path, tmp_path: Path, target: str, action: str, spec: str,
               **env: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", INJECT, target, action, "run",
            str(write(tmp_path, "hooked.yaml", spec)), "--workspace", str(ws(tmp_path)), "--json"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env=cli_env(home, **env), stdin=subprocess.DEVNULL)


def ws(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir(exist_ok=True)
    return path


def latest(home: Path) -> dict[str, object]:
    jobs = json.loads(run_cli(home, "jobs", "--json").stdout)
    return dict(jobs[0]) if jobs else {}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def secret(home: Path, tmp_path: Path) -> Iterator[None]:
    value = write(tmp_path, "value", "s3cr3t-value-for-the-lease-test")
    made = run_cli(home, "secret", "set", "OWN_TOKEN", "--from-file", str(value))
    assert made.returncode == 0, made.stderr
    yield


@pytest.mark.parametrize("point", [CLAIM, PREPARE, COMPLETE],
                         ids=["before-claim", "before-sandbox", "before-result"])
def test_a_job_whose_runner_dies_is_lost_at_once(home: Path, tmp_path: Path, secret: None,
                                                 point: str) -> None:
    died = run_hooked(home, tmp_path, point, "kill", KEEPER)
    assert died.returncode == -signal.SIGKILL, died.stderr
    job = latest(home)  # the next command, whatever it is, sees the runner gone
    assert (job["status"], job["failure_reason"]) == ("failed", "runner_lost"), job
    job_id = str(job["job_id"])
    assert not (home / "artifacts" / job_id).exists()  # partial artifacts removed
    audit = run_cli(home, "show", job_id).stdout
    assert "job.runner_lost" in audit
    if point != CLAIM:  # a lease was issued at the claim: revoked with the loss
        assert "secret.revoked" in audit
    assert not list((home / "runners").iterdir())  # the dead runner's lock is gone too
    nxt = run_cli(home, "run", str(write(tmp_path, "next.yaml", TRIVIAL)),
                  "--workspace", str(ws(tmp_path)))
    assert nxt.returncode == 0, nxt.stderr
    assert not job_dir(home, job_id).exists() and not job_cgroups(home, job_id)


def test_a_result_that_could_not_be_committed_is_lost_at_once(home: Path, tmp_path: Path
                                                               ) -> None:
    failed = run_hooked(home, tmp_path, COMPLETE, "raise", TRIVIAL)
    assert failed.returncode == 4 and "injected" in failed.stderr, failed.stderr
    job = latest(home)  # not `running` until a lease runs out: the runner is known gone
    assert (job["status"], job["failure_reason"]) == ("failed", "runner_lost"), job


def test_a_live_job_is_never_taken_for_lost(home: Path, tmp_path: Path) -> None:
    """A runner slow to save its result (after teardown) still holds the job: other runs of
    the same installation, reaping as they start, leave it alone."""
    argv = [sys.executable, "-c", INJECT, COMPLETE, "3", "run",
            str(write(tmp_path, "slow-save.yaml", TRIVIAL)), "--workspace", str(ws(tmp_path)),
            "--json"]
    slow = subprocess.Popen(argv, env=cli_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (home / "stockade.db").exists() or latest(home).get("status") != "running":
            assert time.monotonic() < deadline and slow.poll() is None
            time.sleep(0.1)
        other = run_cli(home, "run", str(write(tmp_path, "other.yaml", TRIVIAL)),
                        "--workspace", str(ws(tmp_path)))
        assert other.returncode == 0, other.stderr
        assert "lost its runner" not in other.stderr
        out, err = slow.communicate(timeout=60)
    finally:
        slow.kill()
    assert slow.returncode == 0, err
    assert json.loads(out)["status"] == "succeeded"


# a cgroup name of these tests' own: a host may run other stockade versions, whose reapers
# must not be what these tests observe
CGROUP = f"stockade-test-{os.getpid()}"


@pytest.fixture
def slow_job(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A job of another installation (its own state directory), running."""
    home = tmp_path / "first"
    spec = write(tmp_path, "slow.yaml", SLOW)
    proc = subprocess.Popen([STOCKADE, "run", str(spec), "--workspace", str(ws(tmp_path)),
                             "--json"], env=cli_env(home, STOCKADE_CGROUP_NAME=CGROUP),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "started" in line:
            break
    yield home, proc
    proc.kill()
    proc.wait()


def test_another_installation_never_touches_this_ones_job(
        slow_job: tuple[Path, subprocess.Popen[str]], tmp_path: Path) -> None:
    first, proc = slow_job
    job_id = str(latest(first)["job_id"])
    own_runtime = Path(f"/run/stockade-test-{os.getpid()}")  # the job's uid must reach it
    second = run_cli(tmp_path / "second", "run", str(write(tmp_path, "q.yaml", TRIVIAL)),
                     "--workspace", str(ws(tmp_path)), STOCKADE_RUNTIME_DIR=str(own_runtime),
                     STOCKADE_CGROUP_NAME=CGROUP)
    assert second.returncode == 0, second.stderr
    assert proc.poll() is None, "the other installation's job was killed"
    assert job_cgroups(first, job_id, CGROUP) and job_dir(first, job_id).exists()
    assert latest(first)["status"] == "running"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert json.loads(out)["failure_reason"] == "canceled"  # ended by its own runner
    shutil.rmtree(own_runtime, ignore_errors=True)


@pytest.fixture
def foreign(home: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[Path]]]:
    """What other software keeps beside stockade's: a cgroup under stockade's cgroup name with
    a live process in it, and directories named like jobs, old enough to look abandoned."""
    ran = run_cli(home, "run", str(write(tmp_path, "first.yaml", TRIVIAL)),
                  "--workspace", str(ws(tmp_path)), STOCKADE_CGROUP_NAME=CGROUP)
    assert ran.returncode == 0, ran.stderr
    installation = (home / "installation-id").read_text().strip()
    sleeper = subprocess.Popen(["sleep", "120"])
    cgroups = []
    for base in (Path(f"/sys/fs/cgroup/memory/{CGROUP}"), Path(f"/sys/fs/cgroup/pids/{CGROUP}"),
                 Path(f"/sys/fs/cgroup/{CGROUP}")):
        if (base / "cgroup.procs").exists():
            victim = base / f"Victim_Service-{os.getpid()}.slice"
            victim.mkdir()
            cgroups.append(victim)
            (victim / "cgroup.procs").write_text(str(sleeper.pid))
            guess = base / f"{installation}-j1m8aaaaaaaaaaaaaa"  # our prefix, unknown job
            guess.mkdir()
            cgroups.append(guess)
    dirs = [Path("/run/stockade") / "j1m8bbbbbbbbbbbbbb",
            Path("/run/stockade") / installation / "j1m8cccccccccccccc"]
    for d in dirs:
        d.mkdir()
        (d / "keep").write_text("not stockade's\n")
        os.utime(d, (time.time() - 3600, time.time() - 3600))
    yield sleeper, cgroups + dirs
    sleeper.kill()
    sleeper.wait()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    for c in reversed(cgroups):
        if c.exists():
            c.rmdir()


def test_the_reaper_leaves_what_is_not_its_own(
        home: Path, tmp_path: Path,
        foreign: tuple[subprocess.Popen[bytes], list[Path]]) -> None:
    sleeper, paths = foreign
    ran = run_cli(home, "run", str(write(tmp_path, "second.yaml", TRIVIAL)),
                  "--workspace", str(ws(tmp_path)), STOCKADE_CGROUP_NAME=CGROUP)
    assert ran.returncode == 0, ran.stderr
    assert sleeper.poll() is None, "a foreign process was killed"
    assert all(p.exists() for p in paths), [str(p) for p in paths if not p.exists()]


@pytest.mark.parametrize(("env", "config", "named"), [
    ({"STOCKADE_RUNTIME_DIR": "/run"}, "", "runtime_dir '/run'"),
    ({"STOCKADE_RUNTIME_DIR": "/tmp/"}, "", "runtime_dir '/tmp/'"),
    ({"STOCKADE_RUNTIME_DIR": "run/stockade"}, "", "runtime_dir 'run/stockade'"),
    ({}, 'cgroup_name = ""\n', "cgroup_name ''"),
    ({"STOCKADE_CGROUP_NAME": "system.slice"}, "", "cgroup_name 'system.slice'"),
    ({"STOCKADE_CGROUP_NAME": "a/b"}, "", "cgroup_name 'a/b'"),
])
def test_settings_pointing_at_shared_locations_are_refused(
        home: Path, tmp_path: Path, env: dict[str, str], config: str, named: str) -> None:
    extra = dict(env)
    if config:
        extra["STOCKADE_CONFIG"] = str(write(tmp_path, "config.toml", config))
    proc = run_cli(home, "run", str(write(tmp_path, "j.yaml", TRIVIAL)),
                   "--workspace", str(ws(tmp_path)), **extra)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr and "hint:" in proc.stderr
    assert len(proc.stderr.splitlines()) <= 3
