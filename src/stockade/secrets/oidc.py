"""Job identity: short-lived OIDC ID tokens (ES256 JWTs) signed by the control plane.

The job spec is written by whoever opened the pull request, so a relying party (Vault, a cloud
provider) must bind only on claims the spec cannot choose. Who decides each claim:

Not chosen by the spec (bind on these):

- ``iss``: the ``oidc_issuer`` setting (operator).
- ``sub`` = ``trust:<trust>:ref:<ref>``, built only from the two claims below. The trust comes
  first because it is one of three fixed words; the ref, the only free text, comes last, so no
  ref can make ``sub`` read as another trust (``trust:untrusted:ref:x:trust:protected`` still
  starts with ``trust:untrusted:``).
- ``trust``: ``untrusted``, ``trusted`` or ``protected``, from the submitter (``stockade run
  --trust``), never from the spec.
- ``ref``: the source reference, from the submitter (``stockade run --ref``), never from the spec.
- ``job_id``, ``attempt``, ``runner_id``: assigned by the control plane.
- ``image_digest``: the image the job ran; a spec can only name an image the operator accepts
  (today only ``host``).
- ``iat``, ``nbf``, ``exp`` (valid for 5 minutes), ``jti``: set when the token is signed.

Chosen by the spec (informational; never bind on them):

- ``job_name``: the spec's ``name``, free text (within the spec's name rules).
- ``aud``: the spec's ``id_token.aud``, but only within the audiences the operator allows for
  the job's trust (``oidc_audiences_untrusted`` / ``_trusted`` / ``_protected``; untrusted jobs
  get none by default). The control plane checks this at admission and again at every signing.

The signing keys live in ``$STOCKADE_HOME/oidc/keys.json`` (0600). ``rotate`` makes a new key
the signing key; the old one stays published in the JWKS until every token it signed has
expired, then it is dropped.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOKEN_TTL_S = 300
ALGORITHM = "ES256"


class KeyRing:
    """The signing keys of one control plane."""

    def __init__(self, directory: Path, issuer: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = directory / "keys.json"
        self.issuer = issuer.rstrip("/")
        self.clock = clock
        self._keys: list[dict[str, Any]] = []
        if self.path.exists():
            self._keys = json.loads(self.path.read_text())["keys"]
        self._prune()
        if not any(k["retired_at"] is None for k in self._keys):
            self.rotate()

    def _save(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": self._keys}, f)
        os.replace(tmp, self.path)

    def _prune(self) -> None:
        now = self.clock()
        keep = [k for k in self._keys
                if k["retired_at"] is None or now < k["retired_at"] + TOKEN_TTL_S]
        if len(keep) != len(self._keys):
            self._keys = keep
            self._save()

    def rotate(self) -> str:
        """Make a new signing key; retire the current one (kept until its tokens expire)."""
        from joserfc.jwk import ECKey

        now = self.clock()
        for key in self._keys:
            if key["retired_at"] is None:
                key["retired_at"] = now
        new = ECKey.generate_key("P-256", auto_kid=True)
        self._keys.append({"kid": new.kid, "jwk": new.as_dict(private=True),
                           "created_at": now, "retired_at": None})
        self._save()
        return str(new.kid)

    @property
    def active_kid(self) -> str:
        """The id of the key that signs new tokens."""
        return str(next(k["kid"] for k in reversed(self._keys) if k["retired_at"] is None))

    def jwks(self) -> dict[str, Any]:
        """The public keys a verifier needs (current and not yet expired retired ones)."""
        self._prune()
        public = []
        for key in self._keys:
            jwk = {k: v for k, v in key["jwk"].items() if k != "d"}
            public.append({**jwk, "kid": key["kid"], "use": "sig", "alg": ALGORITHM})
        return {"keys": public}

    def discovery(self) -> dict[str, Any]:
        """The ``/.well-known/openid-configuration`` document."""
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "scopes_supported": ["openid"],
            "claims_supported": ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "job_id",
                                 "job_name", "ref", "attempt", "runner_id", "trust",
                                 "image_digest"],
        }

    def mint(self, claims: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """A signed token carrying ``claims`` plus iss/iat/nbf/exp/jti; and its full claims."""
        from joserfc import jwt
        from joserfc.jwk import ECKey

        now = int(self.clock())
        body = {**claims, "iss": self.issuer, "iat": now, "nbf": now,
                "exp": now + TOKEN_TTL_S, "jti": str(uuid.uuid4())}
        key = next(k for k in self._keys if k["kid"] == self.active_kid)
        signer = ECKey.import_key(key["jwk"])
        header = {"alg": ALGORITHM, "kid": key["kid"], "typ": "JWT"}
        return jwt.encode(header, body, signer), body


def subject(trust: str, ref: str) -> str:
    """The ``sub`` claim: ``trust:<trust>:ref:<ref>`` (nothing in it comes from the spec)."""
    return f"trust:{trust}:ref:{ref}"


def job_claims(*, aud: str, job_id: str, job_name: str, ref: str, attempt: int,
               runner_id: str, trust: str, image_digest: str) -> dict[str, Any]:
    """The claims of a job's token besides iss/iat/nbf/exp/jti (see the module docstring for
    which of them the spec chooses: ``job_name``, and ``aud`` within the allowed set)."""
    return {"sub": subject(trust, ref), "aud": aud, "job_id": job_id, "job_name": job_name,
            "ref": ref, "attempt": attempt, "runner_id": runner_id, "trust": trust,
            "image_digest": image_digest}
