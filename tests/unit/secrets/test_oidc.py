"""ID tokens verified by an independent JOSE library (PyJWT): claims, expiry, audience, rotation."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest
from jwt.algorithms import ECAlgorithm

from stockade.secrets.oidc import TOKEN_TTL_S, KeyRing, job_claims, subject


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def verify(token: str, ring: KeyRing, aud: str, **options: object) -> dict[str, object]:
    kid = jwt.get_unverified_header(token)["kid"]
    jwk = next(k for k in ring.jwks()["keys"] if k["kid"] == kid)
    key = ECAlgorithm.from_jwk(json.dumps(jwk))
    return jwt.decode(token, key, algorithms=["ES256"], audience=aud,
                      issuer="https://ci.example.test", options=options)  # type: ignore[arg-type]


CLAIMS = job_claims(aud="vault", job_id="j1", job_name="deploy", ref="refs/heads/main",
                    attempt=1, runner_id="r1", trust="trusted", image_digest="host")


def test_claims(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, "https://ci.example.test/")
    token, claims = ring.mint(CLAIMS)
    got = verify(token, ring, "vault")
    assert got["sub"] == "trust:trusted:ref:refs/heads/main"
    assert got["iss"] == "https://ci.example.test"
    assert got["exp"] - got["iat"] == TOKEN_TTL_S == 300  # type: ignore[operator]
    assert got["nbf"] == got["iat"]
    for key in ("job_id", "attempt", "runner_id", "trust", "image_digest", "jti"):
        assert got[key] == claims[key]
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert (tmp_path / "keys.json").stat().st_mode & 0o777 == 0o600


def test_audience_is_enforced(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, "https://ci.example.test")
    token, _ = ring.mint(CLAIMS)
    with pytest.raises(jwt.InvalidAudienceError):
        verify(token, ring, "someone-else")


def test_expiry_is_enforced(tmp_path: Path) -> None:
    import time

    clock = Clock(time.time() - TOKEN_TTL_S - 5)  # minted just over five minutes ago
    ring = KeyRing(tmp_path, "https://ci.example.test", clock)
    token, _ = ring.mint(CLAIMS)
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(token, ring, "vault")


def test_rotation_keeps_old_keys_until_their_tokens_expire(tmp_path: Path) -> None:
    import time

    clock = Clock(time.time())
    ring = KeyRing(tmp_path, "https://ci.example.test", clock)
    old_token, _ = ring.mint(CLAIMS)
    old_kid = ring.active_kid
    new_kid = ring.rotate()
    new_token, _ = ring.mint(CLAIMS)
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid != old_kid
    assert {k["kid"] for k in ring.jwks()["keys"]} == {old_kid, new_kid}
    assert verify(old_token, ring, "vault")["jti"]
    clock.now += TOKEN_TTL_S + 1
    again = KeyRing(tmp_path, "https://ci.example.test", clock)  # a later process
    assert {k["kid"] for k in again.jwks()["keys"]} == {new_kid}
    assert all("d" not in k for k in again.jwks()["keys"])


def test_discovery_document(tmp_path: Path) -> None:
    doc = KeyRing(tmp_path, "https://ci.example.test").discovery()
    assert doc["jwks_uri"] == "https://ci.example.test/.well-known/jwks.json"
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]


def test_sub_is_not_chosen_by_the_spec() -> None:
    """The spec's name is only job_name; sub is the submitter's trust and ref alone."""
    a = job_claims(aud="vault", job_id="j1", job_name="deploy-prod", ref="refs/pull/1/head",
                   attempt=1, runner_id="r1", trust="untrusted", image_digest="host")
    b = job_claims(aud="vault", job_id="j2", job_name="anything", ref="refs/pull/1/head",
                   attempt=1, runner_id="r2", trust="untrusted", image_digest="host")
    assert a["sub"] == b["sub"] == "trust:untrusted:ref:refs/pull/1/head"
    assert "deploy-prod" not in a["sub"] and a["job_name"] == "deploy-prod"
    # a ref cannot make sub read as another trust: the trust is first and fixed
    assert subject("untrusted", "x:trust:protected").startswith("trust:untrusted:ref:")


def test_audiences_per_trust() -> None:
    from stockade.control import AdmissionPolicy

    default = AdmissionPolicy()
    assert default.audience_refusal("trusted", "https://vault.example.test") is None
    assert default.audience_refusal("protected", "anything") is None
    why = default.audience_refusal("untrusted", "https://vault.example.test")
    assert why is not None and "(allowed: none)" in why
    assert "oidc_audiences_untrusted" in why and "STOCKADE_OIDC_AUDIENCES_UNTRUSTED" in why
    narrow = AdmissionPolicy(oidc_audiences_untrusted=("sts.example.test",),
                             oidc_audiences_trusted=("vault",))
    assert narrow.audience_refusal("untrusted", "sts.example.test") is None
    assert narrow.audience_refusal("untrusted", "sts.example.test.evil") is not None
    assert narrow.audience_refusal("trusted", "vault") is None
    why = narrow.audience_refusal("trusted", "\x1b]52;c;x\x07")
    assert why is not None and "\x1b" not in why and "STOCKADE_OIDC_AUDIENCES_TRUSTED" in why


def test_signing_rechecks_the_audience(tmp_path: Path) -> None:
    """Defence in depth: a job admitted earlier gets no token once its audience is no longer
    allowed for its trust (the operator narrowed the setting); the refusal is audited."""
    from stockade.control import AdmissionPolicy, ControlService
    from stockade.errors import PolicyDenied
    from stockade.spec.parse import parse_spec
    from stockade.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "s.db")
    spec = parse_spec("name: deploy\nid_token: {aud: vault}\n"
                      "steps:\n  - {name: a, run: 'true'}\n").to_job()

    def ring() -> KeyRing:
        return KeyRing(tmp_path / "oidc", "https://ci.example.test")

    lenient = AdmissionPolicy(oidc_audiences_untrusted=("vault",))
    job = ControlService(store, "t", identity=ring, policy=lenient).submit(
        spec, trust="untrusted", ref="refs/pull/7/head")
    assert job.status == "queued"
    strict = ControlService(store, "t", identity=ring)  # the default: untrusted gets none
    assert strict.claim("r1", (), job.id) is not None
    with pytest.raises(PolicyDenied, match="oidc_audiences_untrusted"):
        strict.mint_id_token(job.id, 1, "r1")
    actions = [e.action for e in strict.audit_trail(job.id)]
    assert "oidc.token_refused" in actions and "oidc.token_issued" not in actions
    token = ControlService(store, "t", identity=ring, policy=lenient).mint_id_token(
        job.id, 1, "r1")
    assert verify(token, ring(), "vault")["sub"] == "trust:untrusted:ref:refs/pull/7/head"
