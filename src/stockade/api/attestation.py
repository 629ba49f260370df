"""Runner attestation: what a runner agent measures about itself, the bytes it signs, and the
policy the control plane checks the measurements against.

The scheme (see docs/fleet.md): the server hands out a nonce (``v1.<time>.<random>.<mac>``,
made with a key all replicas share, valid :data:`NONCE_TTL_S`, spent once). The runner signs
:func:`signed_bytes` of the nonce, who it is (the enrolment token id, or its runner id), its
Ed25519 public key and its measurements with its private key, which never leaves its host. The
server verifies the signature with the public key (enrolled with the first attestation), checks
the measurements against the policy and only then issues a short-lived session token; a session
lasts one attestation interval, so a runner attests again to go on working.
"""

import base64
import hashlib
import hmac
import json
import os
import time
from typing import Any, NamedTuple

NONCE_TTL_S = 300.0
DOMAIN = b"stockade-attestation-v1\n"
MAX_MEASUREMENTS_BYTES = 64 * 1024
MEASUREMENT_KEYS = ("stockade_sha256", "bwrap_version", "seccomp_sha256", "doctor", "kernel",
                    "python")


def signed_bytes(nonce: str, subject: str, public_key: str,
                 measurements: dict[str, Any]) -> bytes:
    """The exact bytes a runner signs (and the server verifies)."""
    body = {"nonce": nonce, "subject": subject, "public_key": public_key,
            "measurements": measurements}
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def make_nonce(key: bytes, now: float | None = None) -> str:
    """A fresh nonce, verifiable by any replica that shares ``key``."""
    body = f"v1.{int(time.time() if now is None else now)}.{os.urandom(12).hex()}"
    mac = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{body}.{mac}"


def nonce_refusal(key: bytes, nonce: str, now: float) -> str | None:
    """Why ``nonce`` is not one of ours or is stale (None if it is good); spending it once is
    the store's part."""
    parts = nonce.split(".")
    if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit():
        return "the nonce is malformed"
    mac = hmac.new(key, ".".join(parts[:3]).encode(), hashlib.sha256).hexdigest()[:32]
    if not hmac.compare_digest(mac, parts[3]):
        return "the nonce was not issued by this control plane"
    if not now - NONCE_TTL_S <= int(parts[1]) <= now + 5:
        return "the nonce expired: ask for a new one"
    return None


def nonce_expiry(nonce: str) -> float:
    """When a (valid) nonce stops being accepted."""
    return int(nonce.split(".")[1]) + NONCE_TTL_S


def verify_signature(public_key: str, data: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64) is the Ed25519 signature of ``data`` by ``public_key``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
        key.verify(base64.b64decode(signature, validate=True), data)
    except (ValueError, InvalidSignature):
        return False
    return True


# the controls `stockade doctor` requires (sandbox/checks.py; a unit test keeps them equal):
# the server decides what is required, never the runner's own report
REQUIRED_CONTROLS = ("architecture", "running as root", "sandbox runtime", "per-job host uids",
                     "user namespaces", "seccomp filter", "cgroups", "end-to-end probe")


class AttestationPolicy(NamedTuple):
    """What the control plane requires of a runner's measurements.

    ``stockade_digests``: accepted sha256 digests of the runner's installed stockade code
    (``self``: the server's own code; ``*``: any). ``required_controls``: the doctor controls
    that must be reported active (``*``: :data:`REQUIRED_CONTROLS`).

    The measurements are the runner's own report, signed by its key: they catch a runner
    that is misconfigured or out of date, not a host whose root is hostile (that one can
    report anything); an enrolled runner is trusted with the jobs it may claim (its labels
    and highest trust come from its enrolment token)."""

    stockade_digests: tuple[str, ...] = ("self",)
    required_controls: tuple[str, ...] = ("*",)

    def failures(self, measurements: dict[str, Any], own_digest: str) -> list[str]:
        """What the measurements lack (empty: the runner passes); the texts name only our
        own settings and controls, never what the runner sent."""
        problems = []
        missing = [k for k in MEASUREMENT_KEYS if k not in measurements]
        if missing:
            problems.append(f"measurements missing: {', '.join(missing)}")
        digest = str(measurements.get("stockade_sha256", ""))
        accepted = {own_digest if d == "self" else d for d in self.stockade_digests}
        if "*" not in accepted and digest not in accepted:
            problems.append("the runner's stockade code digest is not an accepted one (it "
                            "must run the server's version, or one in the setting "
                            "attest_stockade_digests)")
        doctor = measurements.get("doctor")
        findings = doctor if isinstance(doctor, list) else []
        if not all(isinstance(f, dict) for f in findings):
            return [*problems, "the doctor findings are malformed"]
        active = {f.get("control") for f in findings if f.get("ok") is True}
        required = [c for r in self.required_controls
                    for c in (REQUIRED_CONTROLS if r == "*" else (r,))]
        for control in required:
            if control not in active:
                problems.append(f"hardening control {control[:60]!r} is not active on the "
                                "runner")
        return problems


def code_digest() -> str:
    """sha256 over the installed stockade package: every file but bytecode caches, by path."""
    from pathlib import Path

    import stockade

    root = Path(stockade.__file__).parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()
                       and "__pycache__" not in p.parts and p.suffix != ".pyc"):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()
