"""A real fleet for tests: `stockade server` processes and runner agents, over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import STOCKADE, cli_env, run_cli

# fast leases so that lost runners are noticed within seconds
FAST = {"STOCKADE_RUNNER_LEASE": "3", "STOCKADE_RUNNER_HEARTBEAT": "0.5"}

def runner_command() -> list[str]:
    """``stockade runner start``."""
    return [STOCKADE, "runner", "start"]


def call(url: str, method: str, path: str, token: str | None = None, body: Any = None,
         timeout: float = 30, raw: bytes | None = None) -> tuple[int, Any]:
    """One JSON request (or ``raw`` bytes); ``(status, parsed body)``."""
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("content-type", "application/json")
    if token is not None:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            try:
                return response.status, json.loads(raw) if raw else None
            except ValueError:
                return response.status, raw.decode(errors="replace")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"null")
        except ValueError:
            return e.code, raw.decode(errors="replace")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0,
             every: float = 0.1) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(every)


class Server:
    """A `stockade server` process on a state directory (and its database)."""

    def __init__(self, home: Path, *args: str, port: int = 0, **env: str) -> None:
        self.home, self.env = home, {**FAST, **env}
        self.proc = subprocess.Popen([STOCKADE, "server", "--listen", f"127.0.0.1:{port}",
                                      *args],
                                     env=cli_env(home, **self.env), stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert "://127.0.0.1:" in line, line + self.proc.stderr.read()
        self.url = line.split("listening on ")[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])

    def call(self, method: str, path: str, token: str | None = None,
             body: Any = None) -> tuple[int, Any]:
        """A request to this server."""
        return call(self.url, method, path, token, body)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def admin_token(home: Path, role: str = "admin", trust: str = "trusted", **env: str) -> str:
    """An API token made with the CLI."""
    made = run_cli(home, "token", "create", f"t-{role}", "--role", role, "--max-trust", trust,
                   **env)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def enrol_token(home: Path, pool: str = "default", ttl: str = "10m", *args: str,
                **env: str) -> str:
    """A single-use enrolment token made with the CLI (``args``: e.g. --labels, --max-trust)."""
    made = run_cli(home, "runner", "enrol-token", "--pool", pool, "--ttl", ttl, *args, **env)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().splitlines()[-1]


class Agent:
    """A runner agent process with its own state directory."""

    def __init__(self, home: Path, server_url: str, enrol: str | None, name: str,
                 *extra: str, **env: str) -> None:
        self.home, self.name = home, name
        self.log = home.parent / f"{name}.agent.log"
        home.mkdir(parents=True, exist_ok=True)
        self.since = self.log.stat().st_size if self.log.exists() else 0  # a restart appends
        args = [*runner_command(), "--server", server_url, "--name", name, *extra]
        if enrol:
            args += ["--enrol-token", enrol]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, env=cli_env(home, **env), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def output(self) -> str:
        """What this agent process printed."""
        with open(self.log, "rb") as f:
            f.seek(self.since)
            return f.read().decode(errors="replace")

    def wait_attested(self, timeout: float = 60) -> None:
        """Until the agent says it is attested (fail with its output if it exits)."""
        def ready() -> bool:
            assert self.proc.poll() is None, f"agent {self.name} exited: {self.output()}"
            return "attested" in self.output()
        wait_for(f"agent {self.name} to attest", ready, timeout)

    def stop(self) -> int:
        """Stop it: SIGTERM (it finishes its jobs), SIGKILL after a while."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def job_status(server: Server, token: str, job_id: str) -> dict[str, Any]:
    """The job's result object."""
    status, body = server.call("GET", f"/api/v1/jobs/{job_id}", token)
    assert status == 200, body
    return dict(body)


def submit(server: Server, token: str, spec: str, **fields: Any) -> str:
    """Queue a job; its id."""
    status, body = server.call("POST", "/api/v1/jobs", token, {"spec": spec, **fields})
    assert status == 201, body
    assert body["status"] == "queued", body
    return str(body["job_id"])


def finished(server: Server, token: str, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """Wait until the job is finished; its result."""
    def done() -> dict[str, Any] | None:
        result = job_status(server, token, job_id)
        return result if result["status"] not in ("queued", "running") else None
    return dict(wait_for(f"job {job_id} to finish", done, timeout, every=0.2))


# what a runner measures, by hand (servers in tests that use it accept any code digest and
# require only the control named here)
FAKE_MEASUREMENTS = {"stockade_sha256": "0" * 64, "bwrap_version": "test", "seccomp_sha256": "x",
                     "doctor": [{"control": "test", "ok": True, "required": True}],
                     "kernel": "test", "python": "test"}
LENIENT = {"STOCKADE_ATTEST_STOCKADE_DIGESTS": "*", "STOCKADE_ATTEST_REQUIRED_CONTROLS": "test"}


class FakeRunner:
    """A runner enrolled for real (its own Ed25519 key, a signed attestation) that the test
    drives by hand; ``token`` is its session token."""

    def __init__(self, url: str, enrol: str, directory: Path, name: str = "fake",
                 labels: tuple[str, ...] = ()) -> None:
        from stockade.runner.attest import Identity

        self.url, self.identity = url, Identity(directory)
        status, nonce = call(url, "POST", "/api/v1/enrol/nonce")
        assert status == 200, nonce
        token_id = enrol.removeprefix("stke_").split("_")[0]
        status, body = call(url, "POST", "/api/v1/enrol", body={
            "token": enrol, "nonce": nonce["nonce"], "public_key": self.identity.public_key,
            "name": name, "labels": list(labels), "concurrency": 1,
            "measurements": FAKE_MEASUREMENTS,
            "signature": self.identity.sign(nonce["nonce"], token_id, FAKE_MEASUREMENTS)})
        assert status == 200, body
        self.runner_id, self.token = body["runner_id"], body["token"]

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A request with this runner's session."""
        return call(self.url, method, path, self.token, body)


DATABASES = ["sqlite", "postgresql"]


def db_env_for(request: pytest.FixtureRequest) -> dict[str, str]:
    """For a fixture parametrized over :data:`DATABASES`: the environment that points stockade
    at that database (a fresh one each)."""
    if request.param == "sqlite":
        return {}
    return {"STOCKADE_DATABASE_URL": str(request.getfixturevalue("database_url"))}
