"""SLSA v1 provenance in DSSE: signed by the control plane's key, checked by us and by an
independent DSSE implementation (securesystemslib), refused when a byte changes."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from stockade.provenance import dsse, slsa
from stockade.provenance.issue import ProvenanceUnavailable, check, issue
from stockade.provenance.keys import SigningKey, load_public_key
from stockade.store.interface import ArtifactRow, JobRow

SPEC = json.dumps({"name": "build", "image": "host", "steps": [{"name": "a", "run": "make"}]})
JOB = JobRow("j0123456789abcdef", "build", SPEC, "[]", "succeeded", None, 0, 1, "r-1", None,
             1_764_400_000.0, 1_764_400_001.5, 1_764_400_009.0, None, "untrusted",
             "refs/pull/7/head")
DIST = ArtifactRow("dist/app.tar.gz", hashlib.sha256(b"app").hexdigest(), 3)
SUMS = ArtifactRow("dist/SHA256SUMS", hashlib.sha256(b"sums").hexdigest(), 4)
ISSUER = "https://ci.example"


SEED = bytes(range(32))


@pytest.fixture
def key() -> SigningKey:
    return SigningKey(SEED)


def test_the_statement_names_the_artifacts_spec_image_builder_and_invocation() -> None:
    doc = slsa.statement(JOB, [DIST, SUMS], slsa.builder_id(ISSUER))
    assert doc["_type"] == "https://in-toto.io/Statement/v1"
    assert doc["predicateType"] == "https://slsa.dev/provenance/v1"
    assert doc["subject"] == [{"name": "dist/app.tar.gz", "digest": {"sha256": DIST.sha256}},
                              {"name": "dist/SHA256SUMS", "digest": {"sha256": SUMS.sha256}}]
    build = doc["predicate"]["buildDefinition"]
    spec, image = build["resolvedDependencies"]
    assert spec["digest"] == {"sha256": hashlib.sha256(SPEC.encode()).hexdigest()}
    assert image == {"uri": "stockade:image:host", "name": "image"}
    assert build["externalParameters"] == {"job_name": "build", "ref": "refs/pull/7/head",
                                           "trust": "untrusted"}
    run = doc["predicate"]["runDetails"]
    assert run["builder"] == {"id": "https://ci.example/builder/v1"}
    assert run["metadata"] == {"invocationId": "j0123456789abcdef/1",
                               "startedOn": "2025-11-29T07:06:41Z",
                               "finishedOn": "2025-11-29T07:06:49Z"}


def test_an_image_pinned_by_digest_is_a_dependency_with_its_digest() -> None:
    pinned = JOB._replace(spec_json=json.dumps({"name": "b", "image": "reg.example/base@sha256:"
                                                + "ab" * 32}))
    image = slsa.statement(pinned, [DIST], "b")["predicate"]["buildDefinition"][
        "resolvedDependencies"][1]
    assert image["digest"] == {"sha256": "ab" * 32}
    assert image["uri"] == "oci://reg.example/base@sha256:" + "ab" * 32


def test_the_same_job_gives_the_same_envelope(key: SigningKey) -> None:
    assert issue(JOB, [DIST], key, ISSUER) == issue(JOB, [DIST], SigningKey(SEED), ISSUER)


def test_no_provenance_before_the_job_finished_or_without_artifacts(key: SigningKey) -> None:
    with pytest.raises(ProvenanceUnavailable, match="is running"):
        issue(JOB._replace(status="running"), [DIST], key, ISSUER)
    with pytest.raises(ProvenanceUnavailable, match="no artifacts"):
        issue(JOB, [], key, ISSUER)


def test_an_envelope_verifies_for_each_subject_and_names_the_builder(key: SigningKey) -> None:
    raw = json.dumps(issue(JOB, [DIST, SUMS], key, ISSUER)).encode()
    public = key.private.public_key()
    assert check(raw, public, SUMS.sha256) == ("dist/SHA256SUMS",
                                               "https://ci.example/builder/v1",
                                               "j0123456789abcdef/1")
    with pytest.raises(dsse.EnvelopeError, match="no subject"):
        check(raw, public, hashlib.sha256(b"other").hexdigest())


def _flip(envelope: dict, field: str) -> bytes:
    changed = dict(envelope)
    data = bytearray(base64.b64decode(changed[field] if field == "payload"
                                      else changed["signatures"][0]["sig"]))
    data[len(data) // 2] ^= 1
    if field == "payload":
        changed["payload"] = base64.b64encode(bytes(data)).decode()
    else:
        changed["signatures"] = [{"keyid": "x", "sig": base64.b64encode(bytes(data)).decode()}]
    return json.dumps(changed).encode()


@pytest.mark.parametrize("field", ["payload", "sig"])
def test_one_changed_byte_fails(key: SigningKey, field: str) -> None:
    envelope = issue(JOB, [DIST], key, ISSUER)
    with pytest.raises(dsse.EnvelopeError, match="no signature"):
        check(_flip(envelope, field), key.private.public_key(), DIST.sha256)


def test_another_key_or_another_payload_type_fails(key: SigningKey) -> None:
    envelope = issue(JOB, [DIST], key, ISSUER)
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(dsse.EnvelopeError, match="no signature"):
        check(json.dumps(envelope).encode(), other, DIST.sha256)
    # the payload type is signed too: relabelled, the signature no longer holds
    relabelled = {**envelope, "payloadType": "application/json"}
    with pytest.raises(dsse.EnvelopeError, match="no signature"):
        check(json.dumps(relabelled).encode(), key.private.public_key(), DIST.sha256)
    signed_other = dsse.sign("text/plain", b"hello", key.private, key.keyid)
    with pytest.raises(dsse.EnvelopeError, match="not an in-toto"):
        check(json.dumps(signed_other).encode(), key.private.public_key(), DIST.sha256)


@pytest.mark.parametrize("raw", [b"", b"[]", b"{", b'{"payloadType": 1}',
                                 b'{"payloadType": "a", "payload": "!!", "signatures": []}',
                                 b"[" * 100_000])
def test_malformed_envelopes_are_refused_plainly(key: SigningKey, raw: bytes) -> None:
    with pytest.raises(dsse.EnvelopeError):
        check(raw, key.private.public_key(), DIST.sha256)


def test_an_ecdsa_p256_signature_verifies_too() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    body = slsa.payload(slsa.statement(JOB, [DIST], "b"))
    sig = private.sign(dsse.pae(slsa.PAYLOAD_TYPE, body), ec.ECDSA(
        __import__("cryptography.hazmat.primitives.hashes", fromlist=["SHA256"]).SHA256()))
    envelope = {"payloadType": slsa.PAYLOAD_TYPE, "payload": base64.b64encode(body).decode(),
                "signatures": [{"sig": base64.b64encode(sig).decode()}]}
    assert check(json.dumps(envelope).encode(), private.public_key(), DIST.sha256).subject \
        == "dist/app.tar.gz"


def test_the_public_key_round_trips_through_pem(key: SigningKey) -> None:
    public = load_public_key(key.public_pem().encode(), "key.pub")
    assert isinstance(public, ed25519.Ed25519PublicKey)
    assert check(json.dumps(issue(JOB, [DIST], key, ISSUER)).encode(), public,
                 DIST.sha256).subject == "dist/app.tar.gz"


def test_public_keys_of_other_kinds_are_refused_by_name() -> None:
    from stockade.errors import UsageError

    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(UsageError, match="neither"):
        load_public_key(p384, "k.pem")
    with pytest.raises(UsageError, match="not a PEM public key"):
        load_public_key(b"hello", "k.pem")


def test_an_independent_dsse_implementation_accepts_our_envelope(key: SigningKey) -> None:
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    envelope = issue(JOB, [DIST], key, ISSUER)
    public = SSlibKey.from_crypto(key.private.public_key(), keyid=key.keyid)
    theirs = Envelope.from_dict(json.loads(json.dumps(envelope)))  # (it edits what it gets)
    assert theirs.verify([public], 1) == {key.keyid: public}
    assert theirs.pae() == dsse.pae(envelope["payloadType"], base64.b64decode(
        envelope["payload"]))
    tampered = Envelope.from_dict(json.loads(_flip(envelope, "payload")))
    from securesystemslib.exceptions import VerificationError

    with pytest.raises(VerificationError):
        tampered.verify([public], 1)
