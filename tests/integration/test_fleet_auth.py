"""Who may do what in the fleet (issue 9): enrolment tokens, attestation, runner sessions,
fencing between runners, quarantine; and every endpoint of the OpenAPI description fuzzed
with schemathesis without a single 5xx; on both databases."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.support.fleet import (
    DATABASES,
    FAKE_MEASUREMENTS,
    LENIENT,
    FakeRunner,
    Server,
    admin_token,
    call,
    enrol_token,
    submit,
)

SPEC = "name: fenced\nsteps:\n  - {name: a, run: 'true'}\n"


class Setup:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.home = root / "server"
        assert run_cli(self.home, "jobs", **env).returncode == 0
        self.server = Server(self.home, **LENIENT, **env)
        self.admin = admin_token(self.home, **env)
        self.n = 0

    def enrol_token(self, *args: str, ttl: str = "10m") -> str:
        return enrol_token(self.home, "default", ttl, *args, **self.env)

    def runner(self, *token_args: str, **kw: Any) -> FakeRunner:
        self.n += 1
        return FakeRunner(self.server.url, self.enrol_token(*token_args),
                          self.root / f"key{self.n}", name=f"fake{self.n}", **kw)

    def audit(self) -> list[dict[str, Any]]:
        status, body = self.server.call("GET", "/api/v1/audit", self.admin)
        assert status == 200, body
        return list(body)


@pytest.fixture(scope="module", params=DATABASES)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Setup]:
    env, name = {}, None
    if request.param == "postgresql":  # one database for the module's tests
        from tests.support.postgres import admin

        server = request.getfixturevalue("postgres_server")
        name = f"stk_{secrets.token_hex(6)}"
        admin(server, f"CREATE DATABASE {name}")
        env = {"STOCKADE_DATABASE_URL": server.url(name)}
    made = Setup(tmp_path_factory.mktemp("fleet-auth"), env)
    yield made
    made.server.stop()
    if name is not None:
        admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def enrol_body(url: str, token: str, key_dir: Path, **override: Any) -> dict[str, Any]:
    from stockade.runner.attest import Identity

    identity = Identity(key_dir)
    _, nonce = call(url, "POST", "/api/v1/enrol/nonce")
    token_id = token.removeprefix("stke_").split("_")[0]
    body = {"token": token, "nonce": nonce["nonce"], "public_key": identity.public_key,
            "name": "x", "labels": [], "concurrency": 1, "measurements": FAKE_MEASUREMENTS,
            "signature": identity.sign(nonce["nonce"], token_id, FAKE_MEASUREMENTS)}
    return {**body, **override}


def attest_body(url: str, runner_id: str, signer: Any) -> dict[str, Any]:
    _, nonce = call(url, "POST", "/api/v1/enrol/nonce")
    return {"runner_id": runner_id, "nonce": nonce["nonce"], "measurements": FAKE_MEASUREMENTS,
            "signature": signer.sign(nonce["nonce"], runner_id, FAKE_MEASUREMENTS)}


def test_an_enrolment_token_works_once_and_only_before_it_expires(setup: Setup) -> None:
    url = setup.server.url
    token = setup.enrol_token()
    assert call(url, "POST", "/api/v1/enrol",
                body=enrol_body(url, token, setup.root / "once"))[0] == 200
    status, detail = call(url, "POST", "/api/v1/enrol",
                          body=enrol_body(url, token, setup.root / "twice"))
    assert status == 403 and "used already" in detail["detail"]
    brief = setup.enrol_token(ttl="1s")
    time.sleep(1.5)
    status, detail = call(url, "POST", "/api/v1/enrol",
                          body=enrol_body(url, brief, setup.root / "late"))
    assert status == 403 and "expired" in detail["detail"]
    reasons = [str(e["detail"].get("reason")) for e in setup.audit()
               if e["action"] == "runner.enrol_refused"]
    assert any("used already" in r for r in reasons)
    assert any("expired" in r for r in reasons)


def test_an_attestation_must_be_signed_by_the_enrolled_key_over_a_fresh_nonce(
        setup: Setup) -> None:
    from stockade.runner.attest import Identity

    url = setup.server.url
    body = enrol_body(url, setup.enrol_token(), setup.root / "forged")
    other = Identity(setup.root / "other-key")
    forged = {**body, "public_key": other.public_key}  # signed by a key it does not enrol
    status, detail = call(url, "POST", "/api/v1/enrol", body=forged)
    assert status == 403 and "signature" in detail["detail"]
    tampered = {**body, "measurements": {**FAKE_MEASUREMENTS, "kernel": "other"}}
    assert call(url, "POST", "/api/v1/enrol", body=tampered)[0] == 403
    assert call(url, "POST", "/api/v1/enrol", body=body)[0] == 200
    replay = enrol_body(url, setup.enrol_token(), setup.root / "replay",
                        nonce=body["nonce"])  # a nonce is spent once
    assert call(url, "POST", "/api/v1/enrol", body=replay)[0] == 403


def test_a_runner_attests_again_only_with_its_own_key(setup: Setup) -> None:
    from stockade.runner.attest import Identity

    url = setup.server.url
    runner = setup.runner()
    thief = Identity(setup.root / "thief")
    assert call(url, "POST", "/api/v1/enrol/attest",
                body=attest_body(url, runner.runner_id, thief))[0] == 403
    status, body = call(url, "POST", "/api/v1/enrol/attest",
                        body=attest_body(url, runner.runner_id, runner.identity))
    assert status == 200 and body["token"] != runner.token


def test_a_runner_cannot_touch_an_attempt_another_runner_holds(setup: Setup) -> None:
    holder, other = setup.runner(), setup.runner()
    job_id = submit(setup.server, setup.admin, SPEC)
    status, claimed = holder.call("POST", "/api/v1/runner/claim?wait=5")
    assert status == 200 and claimed["job_id"] == job_id
    base = f"/api/v1/runner/jobs/{job_id}/{claimed['attempt']}"
    done = {"status": "succeeded", "duration_s": 0.1}
    assert other.call("POST", f"{base}/heartbeat")[0] == 409
    assert other.call("POST", f"{base}/complete", done)[0] == 409
    assert other.call("GET", f"{base}/workspace")[0] == 409
    assert other.call("POST", f"{base}/id-token")[0] == 409
    # an attempt number that is not the current one is fenced too, even for the holder
    assert holder.call("POST", f"/api/v1/runner/jobs/{job_id}/7/complete", done)[0] == 409
    assert holder.call("POST", f"{base}/complete", done) == (200, {"recorded": True, "next": None})
    # the same completion again (its answer was lost) is answered the same; another is fenced
    assert holder.call("POST", f"{base}/complete", done) == (200, {"recorded": True, "next": None})
    assert holder.call("POST", f"{base}/complete", {**done, "status": "failed",
                                                    "failure_reason": "script_failure"})[0] == 409
    assert other.call("POST", f"{base}/complete", done)[0] == 409


def test_what_a_runner_may_be_is_the_admins_call(setup: Setup) -> None:
    url = setup.server.url
    token = setup.enrol_token("--labels", "linux,gpu")
    status, detail = call(url, "POST", "/api/v1/enrol", body=enrol_body(
        url, token, setup.root / "greedy", labels=["prod"]))  # a label it was not given
    assert status == 403 and "labels" in detail["detail"]
    gpu = setup.runner("--labels", "linux,gpu")
    _, runners = setup.server.call("GET", "/api/v1/runners", setup.admin)
    mine = next(r for r in runners if r["runner_id"] == gpu.runner_id)
    assert mine["labels"] == ["gpu", "linux", "pool:default"] and mine["max_trust"] == "trusted"
    protected = admin_token(setup.home, role="submitter", trust="protected", **setup.env)
    job_id = submit(setup.server, protected, "name: release\nlabels: [gpu]\nsteps:\n"
                    "  - {name: a, run: 'true'}\n", trust="protected")
    assert gpu.call("POST", "/api/v1/runner/claim?wait=1")[0] == 204  # beyond its trust
    releaser = setup.runner("--labels", "gpu", "--max-trust", "protected")
    status, claimed = releaser.call("POST", "/api/v1/runner/claim?wait=5")
    assert status == 200 and claimed["job_id"] == job_id


def test_a_runner_reports_only_its_own_kind_of_events_in_its_own_name(setup: Setup) -> None:
    runner = setup.runner()
    job_id = submit(setup.server, setup.admin, SPEC)
    _, claimed = runner.call("POST", "/api/v1/runner/claim?wait=5")
    base = f"/api/v1/runner/jobs/{job_id}/{claimed['attempt']}"
    forged = {"events": [["secret.set", {"name": "PROD_KEY"}]]}
    assert runner.call("POST", f"{base}/report", forged)[0] == 422
    big = {"events": [["secret.leak", {"where": "x" * 10_000}]]}
    assert runner.call("POST", f"{base}/report", big)[0] == 413
    fine = {"events": [["secret.leak", {"secret": "A", "where": "log"}]]}
    assert runner.call("POST", f"{base}/report", fine)[0] == 204
    leak = [e for e in setup.audit() if e["action"] == "secret.leak" and e["job_id"] == job_id]
    assert [e["actor"] for e in leak] == [f"runner:{runner.runner_id}"]
    # a completion names only artifacts this attempt uploaded (not another job's blobs)
    other = setup.runner()
    other_job = submit(setup.server, setup.admin, SPEC)
    _, theirs = other.call("POST", "/api/v1/runner/claim?wait=5")
    digest = hashlib.sha256(b"their bytes").hexdigest()
    status, _ = call(setup.server.url, "PUT",
                     f"/api/v1/runner/jobs/{other_job}/{theirs['attempt']}/artifacts/{digest}",
                     other.token, raw=b"their bytes")
    assert status == 201
    stolen = {"status": "succeeded", "duration_s": 0.1,
              "artifacts": [{"path": "stolen", "sha256": digest, "size": 11}]}
    status, detail = runner.call("POST", f"{base}/complete", stolen)
    assert status == 422 and "not uploaded by this attempt" in detail["detail"]


def test_refused_attestations_fill_the_audit_trail_at_a_bounded_rate(setup: Setup) -> None:
    from stockade.runner.attest import Identity

    url = setup.server.url
    before = len(setup.audit())
    stranger = Identity(setup.root / "stranger")
    for i in range(150):
        call(url, "POST", "/api/v1/enrol/attest", body=attest_body(url, f"nobody{i}", stranger))
    assert len(setup.audit()) - before <= 2 * 60 + 1  # (the test may span two minutes)


@pytest.mark.parametrize("bearer", [None, "", "stks_nope_nope", "stk_x_y", "Basic abc"])
def test_runner_routes_need_a_runner_session(setup: Setup, bearer: str | None) -> None:
    assert call(setup.server.url, "POST", "/api/v1/runner/claim", bearer)[0] == 401
    # an API token, even an admin's, is not a runner session
    assert call(setup.server.url, "POST", "/api/v1/runner/claim", setup.admin)[0] == 401


def test_a_quarantined_runner_is_refused_everywhere(setup: Setup) -> None:
    url = setup.server.url
    runner = setup.runner()
    status, _ = setup.server.call("POST", f"/api/v1/runners/{runner.runner_id}/quarantine",
                                  setup.admin)
    assert status == 200
    assert runner.call("POST", "/api/v1/runner/claim")[0] == 401
    assert call(url, "POST", "/api/v1/enrol/attest",
                body=attest_body(url, runner.runner_id, runner.identity))[0] == 403
    viewer = admin_token(setup.home, role="viewer", **setup.env)
    assert setup.server.call("POST", f"/api/v1/runners/{runner.runner_id}/resume",
                             viewer)[0] == 403


def _refusals(setup: Setup) -> float:
    status, text = setup.server.call("GET", "/metrics", setup.admin)
    assert status == 200, text
    return sum(float(line.split()[-1]) for line in str(text).splitlines()
               if line.startswith("stockade_api_refusals_total"))


def test_a_claim_or_completion_without_a_valid_session_is_401_whatever_its_body(
        setup: Setup) -> None:
    """A claim or a small completion is read before its session is checked, which is read
    with its work in one store turn (api/server.py ``Gate._at_once``): a session token that
    authenticates no runner still gets 401, counted and audited, whatever the body (not
    422 for one that does not validate), and changes nothing; so does a large completion,
    whose session is checked first."""
    holder, banned = setup.runner(), setup.runner()
    job_id = submit(setup.server, setup.admin, SPEC)
    done = {"status": "succeeded", "duration_s": 0.1}
    while True:  # (what earlier tests of the module left queued comes first)
        status, claimed = holder.call("POST", "/api/v1/runner/claim?wait=5")
        assert status == 200, claimed
        if claimed["job_id"] == job_id:
            break
        base = f"/api/v1/runner/jobs/{claimed['job_id']}/{claimed['attempt']}"
        assert holder.call("POST", f"{base}/complete", done)[0] == 200
    assert setup.server.call("POST", f"/api/v1/runners/{banned.runner_id}/quarantine",
                             setup.admin)[0] == 200
    base = f"/api/v1/runner/jobs/{job_id}/{claimed['attempt']}"
    big = {**done, "steps": [{"name": f"step {n:04d}", "status": "succeeded",
                              "duration_s": 0.1} for n in range(400)]}
    bodies = [json.dumps(done).encode(), b"{not json", json.dumps({"status": "odd"}).encode(),
              json.dumps(big).encode()]
    assert len(bodies[-1]) > 16 * 1024
    bearers = ["stks_nope_nope", holder.token[:-2] + ("xx" if holder.token[-2:] != "xx"
                                                     else "yy"), banned.token]
    before = _refusals(setup)
    for bearer in bearers:
        assert call(setup.server.url, "POST", "/api/v1/runner/claim", bearer)[0] == 401
        for query in ("", "?next=true"):
            for body in bodies:
                status, answer = call(setup.server.url, "POST", f"{base}/complete{query}",
                                      bearer, raw=body)
                assert status == 401, (bearer, query, body[:20], answer)
    assert _refusals(setup) - before == len(bearers) * (1 + 2 * len(bodies))
    refused = [e for e in setup.audit()[-60:] if e["action"] == "api.refused"]
    assert any(e["detail"]["reason"] == "unknown runner session"  # (its sessions are gone)
               and e["detail"].get("claimed_token") == banned.token.split("_")[1]
               and e["detail"]["path"] == f"{base}/complete" for e in refused)
    assert holder.call("POST", f"{base}/heartbeat") == (200, {"held": True, "cancel": False})
    assert holder.call("POST", f"{base}/complete", big) == (200, {"recorded": True,
                                                                  "next": None})


def test_a_runner_failing_attestation_is_refused_and_audited(tmp_path: Path) -> None:
    home = tmp_path / "strict"
    assert run_cli(home, "jobs").returncode == 0
    server = Server(home)  # the default policy: the server's own code, every control active
    try:
        status, detail = call(server.url, "POST", "/api/v1/enrol",
                              body=enrol_body(server.url, enrol_token(home), tmp_path / "k"))
        assert status == 403 and "digest" in detail["detail"]
        events = json.loads(run_cli(home, "audit", "list", "--json").stdout)
        assert [e["action"] for e in events].count("runner.attestation_failed") == 1
    finally:
        server.stop()


def fuzz(url: str, op: Any, bearer: str, failures: list[str]) -> None:
    """Up to 15 requests the schema of ``op`` allows; every 5xx is recorded in ``failures``."""
    from hypothesis import HealthCheck, given, settings

    # a claim would wait for work as long as it asks: fuzz it without the wait
    params = {"wait": "0"} if op.path == "/api/v1/runner/claim" else None

    @settings(max_examples=15, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy())
    def check(case: Any) -> None:
        response = case.call(base_url=url, params=params,
                             headers={"Authorization": f"Bearer {bearer}"}, timeout=30)
        if response.status_code >= 500:
            failures.append(f"{op.label}: {response.status_code} for "
                            f"{case.as_curl_command()[:300]}")

    check()


def test_no_endpoint_answers_5xx_to_anything_its_schema_allows(setup: Setup) -> None:
    import schemathesis

    status, doc = setup.server.call("GET", "/openapi.json")
    assert status == 200
    runner = setup.runner()
    failures: list[str] = []
    operations = [r.ok() for r in schemathesis.openapi.from_dict(doc).get_all_operations()]
    assert len(operations) > 30
    for op in operations:
        bearer = runner.token if op.path.startswith("/api/v1/runner/") else setup.admin
        fuzz(setup.server.url, op, bearer, failures)
    assert not failures, "\n".join(failures[:10])
