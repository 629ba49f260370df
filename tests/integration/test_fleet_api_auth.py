"""Who may use the people's routes of ``stockade server``: every route refuses a request without
a token, with a malformed, unknown, expired or revoked one (401) and with a role too small for
it (403), and every refusal is an ``api.refused`` audit event. Refusals are audited within a
budget per server process and minute, so the cases are spread over two replicas."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_cli
from tests.support.fake_runner import ANY_CODE
from tests.support.fleet import Server, admin_token

JOB = "j1m8kbkqqxf0tka0d8"
ROUTES = [  # method, path, the role it needs
    ("GET", f"/api/v1/jobs/{JOB}/log", "viewer"),
    ("GET", f"/api/v1/jobs/{JOB}/log/stream", "viewer"),
    ("GET", f"/api/v1/jobs/{JOB}/artifacts", "viewer"),
    ("GET", f"/api/v1/jobs/{JOB}/artifacts/dist/a", "viewer"),
    ("GET", f"/api/v1/jobs/{JOB}/attempts", "viewer"),
    ("POST", "/api/v1/workspaces", "submitter"),
    ("POST", f"/api/v1/jobs/{JOB}/cancel", "submitter"),
    ("GET", "/api/v1/runners", "admin"),
    ("POST", "/api/v1/runners/r-x/drain", "admin"),
    ("POST", "/api/v1/runners/r-x/resume", "admin"),
    ("POST", "/api/v1/runners/r-x/quarantine", "admin"),
    ("POST", "/api/v1/enrol-tokens", "admin"),
    ("GET", "/api/v1/audit", "admin"),
    ("GET", "/api/v1/secrets", "admin"),
    ("GET", "/api/v1/secrets/NAME", "admin"),
    ("PUT", "/api/v1/secrets/NAME", "admin"),
    ("DELETE", "/api/v1/secrets/NAME", "admin"),
]
BELOW = {"submitter": "viewer", "admin": "submitter"}


class Fleet:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.replicas = [Server(home, **ANY_CODE), Server(home, **ANY_CODE)]
        self.tokens = {role: admin_token(home, role) for role in ("viewer", "submitter",
                                                                   "admin")}
        revoked = admin_token(home, "admin")
        assert run_cli(home, "token", "revoke", revoked.split("_")[1]).returncode == 0
        expired = run_cli(home, "token", "create", "brief", "--role", "admin", "--ttl", "1ms")
        time.sleep(0.05)
        self.bad = {"none": None, "malformed": "not-a-token", "unknown": "stk_tzzzz_secret",
                    "wrong secret": self.tokens["admin"][:-2] + "xx", "revoked": revoked,
                    "expired": expired.stdout.strip()}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("fleet-auth") / "home"
    assert run_cli(home, "jobs").returncode == 0
    made = Fleet(home)
    yield made
    for replica in made.replicas:
        replica.stop()


REASONS = {"none": "no valid bearer token", "malformed": "no valid bearer token",
           "unknown": "unknown token", "wrong secret": "unknown token",
           "revoked": "revoked token", "expired": "expired token"}


def test_every_route_refuses_bad_tokens_and_small_roles_and_audits_it(fleet: Fleet) -> None:
    expected: Counter[tuple[str, str]] = Counter()
    n = 0
    for method, path, role in ROUTES:
        cases = [(kind, token, 401, REASONS[kind]) for kind, token in fleet.bad.items()]
        if role in BELOW:
            small = BELOW[role]
            why = "the viewer role may not do this" if method != "GET" and small == "viewer" \
                else f"the {small} role may not do this ({role} needed)"
            cases.append((small, fleet.tokens[small], 403, why))
        for kind, token, status, reason in cases:
            replica = fleet.replicas[n % 2]
            n += 1
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            answer = httpx.request(method, replica.url + path, headers=headers, timeout=30,
                                   json={"pool": "p", "ttl_s": 60} if method != "GET" else None)
            assert answer.status_code == status, (method, path, kind, answer.text)
            if token:
                assert token not in answer.text
            expected[(path, reason)] += 1
    assert n <= 2 * 60  # within the two replicas' budgets
    trail = httpx.get(fleet.replicas[0].url + "/api/v1/audit", timeout=30, headers={
        "Authorization": f"Bearer {fleet.tokens['admin']}"}).json()
    refused = Counter((e["detail"]["path"], e["detail"]["reason"]) for e in trail
                      if e["action"] == "api.refused")
    assert refused == expected
    for token in fleet.bad.values():
        assert not token or token not in str(trail)  # a presented secret is never recorded


def test_provenance_is_for_token_holders(fleet: Fleet) -> None:
    # (the audit of these refusals is the gate's, tested above within the replicas' budgets)
    for path in (f"/api/v1/jobs/{JOB}/provenance", "/api/v1/provenance/public-key"):
        for kind in ("none", "unknown", "expired"):
            token = fleet.bad[kind]
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            assert httpx.get(fleet.replicas[1].url + path, headers=headers,
                             timeout=30).status_code == 401, (path, kind)
    viewer = {"Authorization": f"Bearer {fleet.tokens['viewer']}"}
    assert httpx.get(fleet.replicas[0].url + f"/api/v1/jobs/{JOB}/provenance", headers=viewer,
                     timeout=30).status_code == 404
    keys = [httpx.get(r.url + "/api/v1/provenance/public-key", headers=viewer,
                      timeout=30).json() for r in fleet.replicas]
    assert keys[0] == keys[1] and keys[0]["public_key"].startswith("-----BEGIN PUBLIC KEY")

