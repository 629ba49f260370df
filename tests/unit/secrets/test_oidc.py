"""ID tokens verified by an independent JOSE library (PyJWT): claims, expiry, audience, rotation."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest
from jwt.algorithms import ECAlgorithm

from stockade.secrets.oidc import TOKEN_TTL_S, KeyRing, subject


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


CLAIMS = {"sub": subject("deploy", "refs/heads/main"), "aud": "vault", "job_id": "j1",
          "job_name": "deploy", "ref": "refs/heads/main", "attempt": 1, "runner_id": "r1",
          "trust": "trusted", "image_digest": "host"}


def test_claims(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, "https://ci.example.test/")
    token, claims = ring.mint(CLAIMS)
    got = verify(token, ring, "vault")
    assert got["sub"] == "job:deploy:ref:refs/heads/main"
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
