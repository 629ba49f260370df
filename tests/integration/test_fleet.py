"""The fleet end to end (issue 9): a real `stockade server`, real runner agents running real
sandboxes, over real HTTP; runners and servers killed, paused and restarted."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.support.fleet import (
    DATABASES,
    Agent,
    Server,
    admin_token,
    db_env_for,
    enrol_token,
    finished,
    job_status,
    submit,
    wait_for,
)


class Fleet:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.home = root / "server"
        assert run_cli(self.home, "jobs", **env).returncode == 0
        self.server = Server(self.home, **env)
        self.token = admin_token(self.home, **env)
        self.agents: list[Agent] = []

    def restart_server(self, **env: str) -> None:
        self.env = {**self.env, **env}
        self.server = Server(self.home, port=self.server.port, **self.env)

    def agent(self, name: str, *extra: str, enrol: bool = True) -> Agent:
        token = enrol_token(self.home, **self.env) if enrol else None
        agent = Agent(self.root / name, self.server.url, token, name, *extra)
        self.agents.append(agent)
        agent.wait_attested()
        return agent

    def runner_id(self, agent: Agent) -> str:
        _, runners = self.server.call("GET", "/api/v1/runners", self.token)
        return next(r["runner_id"] for r in runners if r["name"] == agent.name)

    def running_on(self, job_id: str) -> str | None:
        result = job_status(self.server, self.token, job_id)
        return result.get("runner_id") if result["status"] == "running" else None

    def attempts(self, job_id: str) -> list[dict[str, object]]:
        status, body = self.server.call("GET", f"/api/v1/jobs/{job_id}/attempts", self.token)
        assert status == 200, body
        return list(body)

    def log(self, job_id: str) -> str:
        status, body = self.server.call("GET", f"/api/v1/jobs/{job_id}/log", self.token)
        assert status == 200, body
        return str(body)

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.server.stop()


@pytest.fixture(params=DATABASES)
def db_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return db_env_for(request)


@pytest.fixture
def fleet(tmp_path: Path, db_env: dict[str, str]) -> Iterator[Fleet]:
    made = Fleet(tmp_path, db_env)
    try:
        yield made
    finally:
        made.close()


def step_job(name: str, script: str) -> str:
    return f"name: {name}\nsteps:\n  - name: s\n    run: |\n" + "".join(
        f"      {line}\n" for line in script.splitlines())


def test_jobs_across_runners_each_run_exactly_once(fleet: Fleet) -> None:
    for i in range(3):
        fleet.agent(f"r{i}", "--concurrency", "2")
    ids = [submit(fleet.server, fleet.token, step_job(f"j{i}", "echo ran-$STOCKADE_JOB_ID"))
           for i in range(12)]
    results = [finished(fleet.server, fleet.token, job_id) for job_id in ids]
    assert [r["status"] for r in results] == ["succeeded"] * 12
    assert all(r["attempt"] == 1 for r in results)
    for job_id in ids:
        assert fleet.log(job_id).count(f"ran-{job_id}") == 1
        assert [a["outcome"] for a in fleet.attempts(job_id)] == ["succeeded"]
    used = Counter(r["runner_id"] for r in results)
    assert len(used) >= 2, used  # the work was shared


def test_a_runner_killed_mid_job_loses_the_attempt_and_the_job_completes_elsewhere(
        fleet: Fleet) -> None:
    first = fleet.agent("first")
    job_id = submit(fleet.server, fleet.token,
                    step_job("requeued", "echo attempt-$STOCKADE_ATTEMPT; sleep 2; echo done"))
    wait_for("the job to run on the first runner", lambda: fleet.running_on(job_id))
    # its step has started (claimed is not enough: on a loaded machine the sandbox may not
    # exist yet, and then the agent leaves nothing to clean up)
    wait_for("the step to start", lambda: "attempt-1" in fleet.log(job_id))
    first.proc.kill()  # kill -9: no goodbye, no completion
    first.proc.wait()
    second = fleet.agent("second")
    result = finished(fleet.server, fleet.token, job_id)
    assert result["status"] == "succeeded" and result["attempt"] == 2
    attempts = fleet.attempts(job_id)
    assert [a["outcome"] for a in attempts] == ["lost", "succeeded"]
    assert attempts[1]["runner_id"] == fleet.runner_id(second) != attempts[0]["runner_id"]
    assert "attempt-2" in fleet.log(job_id)
    # the killed agent comes back: it attests with its key and removes what its sandbox left
    back = Agent(first.home, fleet.server.url, None, "first")
    fleet.agents.append(back)
    back.wait_attested()
    assert f"job {job_id} left" in back.output()


def test_a_paused_runner_cannot_complete_a_job_that_was_given_to_another(
        fleet: Fleet) -> None:
    paused = fleet.agent("paused")
    job_id = submit(fleet.server, fleet.token, step_job(
        "partitioned", "echo attempt-$STOCKADE_ATTEMPT; sleep 3; echo end-$STOCKADE_ATTEMPT"))
    wait_for("the job to run", lambda: fleet.running_on(job_id))
    os.kill(paused.proc.pid, signal.SIGSTOP)  # partitioned: no heartbeats past the lease
    try:
        wait_for("the lease to run out", lambda: job_status(
            fleet.server, fleet.token, job_id)["status"] == "queued", timeout=30)
        other = fleet.agent("other")
        result = finished(fleet.server, fleet.token, job_id)
    finally:
        os.kill(paused.proc.pid, signal.SIGCONT)
    assert result["status"] == "succeeded" and result["attempt"] == 2
    assert result["runner_id"] == fleet.runner_id(other)
    time.sleep(5)  # the paused runner wakes up, finishes its attempt and tries to report it
    again = job_status(fleet.server, fleet.token, job_id)
    assert (again["status"], again["attempt"], again["runner_id"]) == (
        "succeeded", 2, fleet.runner_id(other))
    assert [a["outcome"] for a in fleet.attempts(job_id)] == ["lost", "succeeded"]
    assert "end-1" not in fleet.log(job_id)  # nothing of the stale attempt after its fence
    assert paused.proc.poll() is None  # it lives on, and takes new work
    assert finished(fleet.server, fleet.token, submit(
        fleet.server, fleet.token, step_job("after", "true")))["status"] == "succeeded"


def test_a_server_killed_mid_job_loses_no_log_line(fleet: Fleet) -> None:
    fleet.server.stop()  # a lease long enough for the restart (runners fence themselves)
    fleet.restart_server(STOCKADE_RUNNER_LEASE="20")
    fleet.agent("steady")
    job_id = submit(fleet.server, fleet.token, step_job(
        "through-restart", "for i in $(seq 1 40); do echo line-$i; sleep 0.1; done"))
    wait_for("the job to run", lambda: fleet.running_on(job_id))
    time.sleep(0.8)
    fleet.server.proc.kill()  # kill -9 mid-run
    fleet.server.proc.wait()
    time.sleep(3)
    fleet.restart_server()
    result = finished(fleet.server, fleet.token, job_id)
    assert result["status"] == "succeeded" and result["attempt"] == 1
    log = fleet.log(job_id)
    for i in range(1, 41):
        assert log.count(f"| line-{i}\n") == 1, (i, log)


def test_cancel_reaches_the_sandbox_within_a_heartbeat(fleet: Fleet) -> None:
    fleet.agent("busy")
    job_id = submit(fleet.server, fleet.token, step_job("long", "sleep 120"))
    wait_for("the job to run", lambda: fleet.running_on(job_id))
    time.sleep(0.5)
    asked = time.monotonic()
    status, body = fleet.server.call("POST", f"/api/v1/jobs/{job_id}/cancel", fleet.token)
    assert status == 200, body
    result = finished(fleet.server, fleet.token, job_id, timeout=30)
    assert time.monotonic() - asked < 10
    assert (result["status"], result["failure_reason"]) == ("failed", "canceled")
    assert result["steps"][0]["status"] == "canceled"


def test_a_drained_runner_finishes_its_job_and_takes_no_new_one(fleet: Fleet) -> None:
    agent = fleet.agent("drained")
    runner_id = fleet.runner_id(agent)
    first = submit(fleet.server, fleet.token, step_job("first", "sleep 2"))
    wait_for("the job to run", lambda: fleet.running_on(first))
    assert fleet.server.call("POST", f"/api/v1/runners/{runner_id}/drain", fleet.token)[0] \
        == 200
    second = submit(fleet.server, fleet.token, step_job("second", "true"))
    assert finished(fleet.server, fleet.token, first)["status"] == "succeeded"
    time.sleep(1.5)
    assert job_status(fleet.server, fleet.token, second)["status"] == "queued"
    assert fleet.server.call("POST", f"/api/v1/runners/{runner_id}/resume", fleet.token)[0] \
        == 200
    assert finished(fleet.server, fleet.token, second)["status"] == "succeeded"


def test_a_quarantined_runner_loses_its_jobs_and_its_credentials(fleet: Fleet) -> None:
    agent = fleet.agent("suspect")
    runner_id = fleet.runner_id(agent)
    job_id = submit(fleet.server, fleet.token, step_job("victim", "sleep 120"))
    wait_for("the job to run", lambda: fleet.running_on(job_id))
    status, body = fleet.server.call("POST", f"/api/v1/runners/{runner_id}/quarantine",
                                     fleet.token)
    assert status == 200, body
    result = job_status(fleet.server, fleet.token, job_id)
    assert (result["status"], result["failure_reason"]) == ("failed", "runner_lost")
    assert agent.proc.wait(timeout=30) == 4  # it stopped its sandboxes and gave up
    assert "quarantined" in agent.output()
    # its key is no longer enough: only a new enrolment (an admin's token) readmits it
    back = Agent(agent.home, fleet.server.url, None, "suspect")
    assert back.proc.wait(timeout=60) == 2
    assert "enrol" in back.output()
    actions = [e["action"] for e in fleet.server.call("GET", "/api/v1/audit?job=" + job_id,
                                                      fleet.token)[1]]
    assert "job.runner_lost" in actions


@pytest.fixture
def pg_env(database_url: str) -> dict[str, str]:
    return {"STOCKADE_DATABASE_URL": database_url}


def test_two_replicas_on_one_postgresql_share_jobs_runners_and_live_logs(
        tmp_path: Path, pg_env: dict[str, str]) -> None:
    fleet = Fleet(tmp_path, pg_env)
    other = Server(fleet.home, **pg_env)  # a second replica on the same database
    try:
        for i, server in enumerate((fleet.server, other, fleet.server, other)):
            agent = Agent(tmp_path / f"a{i}", server.url, enrol_token(fleet.home, **pg_env),
                          f"a{i}")
            fleet.agents.append(agent)
            agent.wait_attested()
        ids = [submit(server, fleet.token, step_job(f"r{i}", "echo ran-$STOCKADE_JOB_ID"))
               for i in range(8) for server in (fleet.server, other)]
        for job_id in ids:  # each replica answers for every job
            for server in (fleet.server, other):
                assert finished(server, fleet.token, job_id)["status"] == "succeeded"
            assert fleet.log(job_id).count(f"ran-{job_id}") == 1
            assert len(fleet.attempts(job_id)) == 1
        # a client on one replica follows live a job that runners of the other one run
        job_id = submit(other, fleet.token, step_job(
            "followed", "for i in 1 2 3; do echo tick-$i; sleep 0.3; done"))
        follow = run_cli(fleet.home, "logs", "-f", job_id, STOCKADE_SERVER=fleet.server.url,
                         STOCKADE_TOKEN=fleet.token, timeout=120)
        assert follow.returncode == 0, follow.stderr
        assert [line for line in follow.stdout.splitlines() if "tick-" in line] and \
            all(f"tick-{i}" in follow.stdout for i in (1, 2, 3))
    finally:
        other.stop()
        fleet.close()


def test_https_and_metrics(tmp_path: Path) -> None:
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    home = tmp_path / "server"
    assert run_cli(home, "jobs").returncode == 0
    server = Server(home, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert server.url.startswith("https://127.0.0.1:")
        token = admin_token(home)
        agent = Agent(tmp_path / "r", server.url, enrol_token(home), "tls", "--ca-file",
                      str(cert))
        agent.wait_attested()
        spec = tmp_path / "job.yaml"
        spec.write_text(step_job("secure", "echo over-tls"))
        (tmp_path / "ws").mkdir()
        done = run_cli(home, "submit", str(spec), "--workspace", str(tmp_path / "ws"), "--json",
                       STOCKADE_SERVER=server.url, STOCKADE_TOKEN=token,
                       STOCKADE_CA_FILE=str(cert), timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "succeeded"
        untrusted = run_cli(home, "jobs", STOCKADE_SERVER=server.url, STOCKADE_TOKEN=token)
        assert untrusted.returncode == 4 and "certificate" in untrusted.stderr
        metrics = subprocess.run(["curl", "-s", "--cacert", str(cert), "-H",
                                  f"Authorization: Bearer {token}", server.url + "/metrics"],
                                 capture_output=True, text=True, check=True).stdout
        assert 'stockade_runner_attestations_total{result="passed",stage="enrol"} 1.0' \
            in metrics
        assert "stockade_claims_total 1.0" in metrics
        assert 'stockade_jobs{status="succeeded"} 1.0' in metrics
        anonymous = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                    "--cacert", str(cert), server.url + "/metrics"],
                                   capture_output=True, text=True).stdout
        assert anonymous == "401"
        agent.stop()
    finally:
        server.stop()


def test_a_submitted_workspace_secret_and_artifact_travel_over_the_wire(
        fleet: Fleet, tmp_path: Path) -> None:
    import hashlib
    import subprocess
    import urllib.request

    from tests.conftest import STOCKADE, cli_env

    subprocess.run([STOCKADE, "secret", "set", "DEPLOY_TOKEN"], input="s3cr3t-over-wire\n",
                   text=True, check=True, capture_output=True,
                   env=cli_env(fleet.home, **fleet.env))
    fleet.agent("worker")
    workspace = tmp_path / "ws"
    (workspace / "src").mkdir(parents=True)
    (workspace / "src" / "input.txt").write_text("from the client\n")
    (workspace / "skip.log").write_text("excluded\n")
    spec = tmp_path / "job.yaml"
    spec.write_text("name: wire\nsecrets: [DEPLOY_TOKEN]\nartifacts: [out/*]\nsteps:\n"
                    "  - name: build\n    run: |\n      mkdir -p out\n"
                    "      cat src/input.txt > out/result.txt\n"
                    "      test ! -e skip.log && echo no-skip\n"
                    "      echo token=$DEPLOY_TOKEN\n")
    done = run_cli(fleet.home, "submit", str(spec), "--workspace", str(workspace), "--exclude",
                   "*.log", "--json", "--ref", "refs/heads/main", STOCKADE_SERVER=fleet.server.url,
                   STOCKADE_TOKEN=fleet.token, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded"
    log = fleet.log(result["job_id"])
    assert "no-skip" in log and "token=***" in log and "s3cr3t" not in log
    (artifact,) = result["artifacts"]
    assert artifact["path"] == "out/result.txt"
    request = urllib.request.Request(
        f"{fleet.server.url}/api/v1/jobs/{result['job_id']}/artifacts/out/result.txt",
        headers={"Authorization": f"Bearer {fleet.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        data = response.read()
    assert data == b"from the client\n"
    assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
    # its provenance, signed by the server, checks out elsewhere with the server's public key
    remote = {"STOCKADE_SERVER": fleet.server.url, "STOCKADE_TOKEN": fleet.token}
    envelope = run_cli(fleet.home, "provenance", result["job_id"], **remote)
    public = run_cli(fleet.home, "provenance", "--public-key", **remote)
    assert envelope.returncode == 0 and public.returncode == 0, envelope.stderr + public.stderr
    (tmp_path / "result.txt").write_bytes(data)
    (tmp_path / "prov.json").write_text(envelope.stdout)
    (tmp_path / "server.pub").write_text(public.stdout)
    verified = run_cli(tmp_path / "elsewhere", "verify", str(tmp_path / "result.txt"),
                       "--provenance", str(tmp_path / "prov.json"), "--key",
                       str(tmp_path / "server.pub"))
    assert verified.returncode == 0 and "verified: out/result.txt" in verified.stdout, \
        verified.stderr
    # nothing of the job stays on the runner: the server has it all
    agent_home = fleet.agents[0].home
    wait_for("the runner to clean up", lambda: not list((agent_home / "artifacts").iterdir())
             and not list((agent_home / "logs").iterdir()), timeout=10)


def test_readyz_says_when_the_schema_is_not_the_servers(tmp_path: Path) -> None:
    import sqlite3

    home = tmp_path / "server"
    assert run_cli(home, "jobs").returncode == 0
    server = Server(home)
    try:
        assert server.call("GET", "/readyz") == (200, {"status": "ready"})
        db = sqlite3.connect(home / "stockade.db")
        db.execute("UPDATE alembic_version SET version_num = '0006'")
        db.commit()
        db.close()
        status, body = server.call("GET", "/readyz")
        assert status == 503 and "0006" in body["reason"]
    finally:
        server.stop()


def test_a_stopping_server_answers_long_polls_at_once(tmp_path: Path) -> None:
    """SIGTERM while a runner long-polls (30 s): the poll is answered (no job) and the server
    is gone within seconds, not when the poll would have ended."""
    import threading

    from tests.support.fake_runner import ANY_CODE, FakeRunner

    home = tmp_path / "server"
    assert run_cli(home, "jobs").returncode == 0
    server = Server(home, **ANY_CODE)
    try:
        runner = FakeRunner(server.url, enrol_token(home), "poller")
        answers: list[int] = []
        poll = threading.Thread(target=lambda: answers.append(runner.http.post(
            "/api/v1/runner/claim", params={"wait": 30}).status_code))
        poll.start()
        time.sleep(1.0)  # in its long poll by now
        asked = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=20) == -signal.SIGTERM
        took = time.monotonic() - asked
        poll.join(10)
        assert answers == [204]
        assert took < 5, f"the server took {took:.1f} s to stop"
    finally:
        server.stop()


def test_a_runner_cut_off_from_the_server_stops_its_job_before_the_lease_runs_out(
        fleet: Fleet) -> None:
    fleet.agent("cut-off")
    job_id = submit(fleet.server, fleet.token, step_job("alone", "sleep 60"))
    wait_for("the job to run", lambda: fleet.running_on(job_id))
    fleet.server.proc.kill()  # no server: the lease (3 s) cannot be extended
    fleet.server.proc.wait()
    time.sleep(5)
    fleet.restart_server()
    result = finished(fleet.server, fleet.token, job_id, timeout=60)
    assert (result["status"], result["failure_reason"]) == ("failed", "canceled")
    assert "did not answer" in fleet.log(job_id)


def test_the_audit_trail_on_postgresql_verifies_against_its_head_row(
        tmp_path: Path, pg_env: dict[str, str]) -> None:
    home = tmp_path / "state"
    assert run_cli(home, "token", "create", "x", "--role", "viewer", **pg_env).returncode == 0
    verified = run_cli(home, "audit", "verify", **pg_env)
    assert verified.returncode == 0 and "audit trail intact: 1 events" in verified.stdout
    anchored = run_cli(home, "audit", "anchor", **pg_env)
    assert anchored.returncode == 2 and "head row is the anchor" in anchored.stderr


def test_a_workspace_the_job_may_not_have_fails_the_job_not_the_runner(
        fleet: Fleet, tmp_path: Path) -> None:
    """An archive bigger than the spec's resources.workspace (the server takes it up to its
    own limit) is refused by the runner: the job fails at once as policy_denied, saying why
    (it was left to its lease: requeued, then failed runner_lost minutes later)."""
    import hashlib
    import io
    import urllib.request

    from stockade.sandbox.archive import pack
    from stockade.sandbox.interface import WorkspaceSource

    tree = tmp_path / "big"
    tree.mkdir()
    (tree / "noise").write_bytes(os.urandom(2 << 20))
    out = io.BytesIO()
    pack(WorkspaceSource(tree, ()), out, 8 << 20)
    data = out.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    request = urllib.request.Request(f"{fleet.server.url}/api/v1/workspaces", data=data,
                                     method="POST", headers={
                                         "Authorization": f"Bearer {fleet.token}",
                                         "X-Stockade-Sha256": digest})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 201
    fleet.agent("unpacker")
    status, job = fleet.server.call("POST", "/api/v1/jobs", fleet.token, {
        "spec": "name: small\nresources: {workspace: 1Mi}\nsteps:\n  - {name: a, run: 'true'}\n",
        "workspace_sha256": digest})
    assert status == 201, job
    result = wait_for("the job to end", lambda: (r := job_status(
        fleet.server, fleet.token, job["job_id"]))["status"] not in ("queued", "running") and r,
        timeout=60)
    assert (result["status"], result["failure_reason"]) == ("failed", "policy_denied"), result
    assert "the workspace archive was refused" in result["error"]
    assert [a["outcome"] for a in fleet.attempts(job["job_id"])] == ["failed"]
