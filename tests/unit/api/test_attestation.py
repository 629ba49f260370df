"""The attestation policy: what the server requires, whatever the runner says it requires."""

from __future__ import annotations

from pathlib import Path

from stockade.api.attestation import REQUIRED_CONTROLS, AttestationPolicy, make_nonce, nonce_refusal

GOOD = {"stockade_sha256": "a" * 64, "bwrap_version": "x", "seccomp_sha256": "x",
        "kernel": "x", "python": "x",
        "doctor": [{"control": c, "ok": True, "required": True} for c in REQUIRED_CONTROLS]}


def test_the_required_controls_are_the_ones_doctor_requires(tmp_path: Path) -> None:
    from stockade.config import Settings
    from stockade.sandbox.bwrap import BwrapBackend

    findings = BwrapBackend(Settings(home=tmp_path)).check()
    assert tuple(f.control for f in findings if f.required) == REQUIRED_CONTROLS


def test_a_runner_cannot_declare_a_control_optional() -> None:
    policy = AttestationPolicy()
    assert policy.failures(GOOD, "a" * 64) == []
    lying = {**GOOD, "doctor": [{**f, "required": False, "ok": f["control"] != "seccomp filter"}
                                for f in GOOD["doctor"]]}
    assert policy.failures(lying, "a" * 64) == [
        "hardening control 'seccomp filter' is not active on the runner"]
    silent = {**GOOD, "doctor": []}
    assert len(policy.failures(silent, "a" * 64)) == len(REQUIRED_CONTROLS)


def test_refusals_never_quote_what_the_runner_sent() -> None:
    hostile = {**GOOD, "stockade_sha256": "\x1b]52;c;evil\x07",
               "doctor": [{"control": "\x1b[2J", "ok": False}]}
    for problem in AttestationPolicy().failures(hostile, "b" * 64):
        assert "\x1b" not in problem and "evil" not in problem


def test_nonces_are_ours_and_fresh() -> None:
    key = b"k" * 32
    nonce = make_nonce(key, now=1000.0)
    assert nonce_refusal(key, nonce, 1000.0) is None
    assert "expired" in str(nonce_refusal(key, nonce, 1400.0))
    assert "not issued" in str(nonce_refusal(b"x" * 32, nonce, 1000.0))
    assert "malformed" in str(nonce_refusal(key, "v1.x", 1000.0))


def test_every_backend_reports_the_required_controls(tmp_path: Path) -> None:
    from stockade.config import Settings
    from stockade.sandbox import get_backend

    for name in ("oci", "runsc"):
        findings = get_backend(name, Settings(home=tmp_path)).check()
        assert tuple(f.control for f in findings if f.required) == REQUIRED_CONTROLS, name
