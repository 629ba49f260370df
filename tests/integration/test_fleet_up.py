"""``stockade up``: a server and runner agents on this host in one command, ready when it prints
the two variables, stopped cleanly (runners, then the server; its admin token revoked) by
SIGTERM, and stopped with the failure named when a part does not start."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import STOCKADE, cli_env, run_cli

JOB = "name: via-up\nsteps:\n  - {name: a, run: 'cat README; id -u'}\n"


class Up:
    """A running ``stockade up``."""

    def __init__(self, home: Path, *args: str, **env: str) -> None:
        self.home = home
        self.proc = subprocess.Popen([STOCKADE, "up", *args], env=cli_env(home, **env),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)

    def variables(self) -> dict[str, str]:
        """The two lines it prints once ready."""
        assert self.proc.stdout is not None
        lines = [self.proc.stdout.readline() for _ in range(2)]
        assert all("=" in line for line in lines), (lines, self.stop()[1])
        return dict(line.strip().split("=", 1) for line in lines)

    def children(self) -> list[int]:
        """The processes it started (its direct children)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> tuple[int, str]:
        """SIGTERM; its exit code and what it said on stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_starts_a_fleet_and_sigterm_stops_all_of_it(home: Path, tmp_path: Path) -> None:
    env_file = tmp_path / "fleet.env"
    up = Up(home, "--runners", "2", "--env-file", str(env_file))
    try:
        variables = up.variables()
        assert variables["STOCKADE_SERVER"].startswith("http://127.0.0.1:")
        assert env_file.read_text() == "".join(f"{k}={v}\n" for k, v in variables.items())
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        listed = run_cli(home, "runner", "list", "--json", **variables)
        assert listed.returncode == 0, listed.stderr
        runners = {r["name"]: r["status"] for r in json.loads(listed.stdout)}
        assert runners == {"up-1": "active", "up-2": "active"}
        children = up.children()
        assert len(children) == 3  # the server and two runners
    finally:
        code, err = up.stop()
    assert code == 0, err
    assert "stopping" in err and "Traceback" not in err
    assert not any(_alive(pid) for pid in children)
    tokens = run_cli(home, "token", "list").stdout
    assert "revoked" in tokens and "stockade-up" in tokens  # its admin token is revoked


def test_a_job_runs_on_the_fleet_up_started(home: Path, tmp_path: Path) -> None:
    up = Up(home)
    try:
        variables = up.variables()
        (tmp_path / "ws").mkdir()
        (tmp_path / "ws" / "README").write_text("hello through up\n")
        (tmp_path / "job.yaml").write_text(JOB)
        done = run_cli(home, "submit", str(tmp_path / "job.yaml"), "--workspace",
                       str(tmp_path / "ws"), "--follow", "--json", **variables)
        assert done.returncode == 0, (done.stderr, up.stop()[1])
        assert json.loads(done.stdout)["status"] == "succeeded"
        assert "hello through up" in done.stderr  # the live log
    finally:
        code, err = up.stop()
    assert code == 0, err


def test_a_runner_that_cannot_start_stops_everything_and_is_named(home: Path) -> None:
    """The server demands a hardening control no host has: the runner's attestation fails."""
    up = Up(home, STOCKADE_ATTEST_REQUIRED_CONTROLS="no_such_control")
    try:
        out, err = up.proc.communicate(timeout=150)
    finally:
        if up.proc.poll() is None:
            up.stop()
    assert up.proc.returncode == 4, err
    assert "up-1 exited" in err and "no_such_control" in err and out == ""


def test_up_refuses_what_it_cannot_serve_safely(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run_cli(home, "up", "--runners", "0", "--listen", f"127.0.0.1:{port}",
                       timeout=120)
    assert done.returncode == 4 and "cannot listen" in done.stderr, done.stderr
    for bad in (["--listen", "0.0.0.0:0"], ["--runners", "99"]):
        done = run_cli(home, "up", *bad)
        assert done.returncode == 2 and done.stdout == "", done.stderr


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_env_file_is_a_new_file_of_ours_in_place_of_anyone_elses(home: Path,
                                                                      tmp_path: Path) -> None:
    """PATH in a sticky directory everyone may write to, made by another user (mode 0666)
    and held open by them: the token goes into a new file, 0600, that they cannot read."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    env_file = shared / "fleet.env"
    env_file.write_text("theirs\n")
    os.chown(env_file, 65534, 65534)
    env_file.chmod(0o666)
    held = env_file.open()  # what its owner may have kept open
    up = Up(home, "--runners", "0", "--env-file", str(env_file))
    try:
        variables = up.variables()
        info = env_file.lstat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.geteuid(), 0o600)
        assert env_file.read_text() == "".join(f"{k}={v}\n" for k, v in variables.items())
        assert held.read() == "theirs\n"  # the other user's file was not written to
        as_nobody = subprocess.run(["cat", str(env_file)], user=65534, group=65534,
                                   extra_groups=[], capture_output=True, text=True)
        assert as_nobody.returncode != 0 and variables["STOCKADE_TOKEN"] not in as_nobody.stdout
        assert sorted(p.name for p in shared.iterdir()) == ["fleet.env"]  # no temporary left
    finally:
        held.close()
        code, err = up.stop()
    assert code == 0, err
    for odd in (shared, shared / "link"):
        if odd.name == "link":
            odd.symlink_to(env_file)
        done = run_cli(home, "up", "--runners", "0", "--env-file", str(odd), timeout=60)
        assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr


def test_killing_up_takes_its_server_and_runners_with_it(home: Path) -> None:
    """SIGKILL gives up no chance to stop its children: they get SIGTERM from the kernel when
    it dies; its admin token expires in 7 days, and the next up revokes it at once."""
    up = Up(home, "--runners", "1")
    try:
        old = up.variables()
        children = up.children()
        assert len(children) == 2
        with sqlite3.connect(home / "stockade.db") as db:
            lifetimes = db.execute("SELECT expires_at - created_at FROM api_tokens WHERE name "
                                   "LIKE 'stockade-up-%'").fetchall()
        assert len(lifetimes) == 1 and abs(lifetimes[0][0] - 7 * 86400) < 1, lifetimes
        killed = time.monotonic()
        up.proc.kill()
        up.proc.wait()
        deadline = killed + 10
        while not all(_gone(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(pid) for pid in children), [p for p in children if not _gone(p)]
        print(f"children gone {time.monotonic() - killed:.2f} s after SIGKILL")
    finally:
        for pid in up.children():
            os.kill(pid, signal.SIGKILL)
        up.stop()
    again = Up(home, "--runners", "0")
    try:
        new = again.variables()
        refused = run_cli(home, "jobs", STOCKADE_SERVER=new["STOCKADE_SERVER"],
                          STOCKADE_TOKEN=old["STOCKADE_TOKEN"])  # the killed up's token
        assert refused.returncode == 2 and "revoked" in refused.stderr, refused.stderr
    finally:
        code, err = again.stop()
    assert code == 0, err
