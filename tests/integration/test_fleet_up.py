"""``stockade up``: a server and runner agents on this host in one command, ready when it prints
the two variables, stopped cleanly (runners, then the server; its admin token revoked) by
SIGTERM, and stopped with the failure named when a part does not start."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
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
