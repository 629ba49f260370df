"""Issuing a job's signed provenance and checking an artifact against one."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from stockade.provenance import dsse, slsa
from stockade.provenance.keys import SigningKey
from stockade.store.interface import ArtifactRow, JobRow


class ProvenanceUnavailable(Exception):
    """The job has no provenance (yet): not finished, or no artifacts."""


class Verified(NamedTuple):
    """What a verified statement says about the artifact."""

    subject: str
    builder: str
    invocation: str


def issue(job: JobRow, artifacts: Sequence[ArtifactRow], key: SigningKey,
          issuer: str) -> dict[str, Any]:
    """The DSSE envelope of ``job``'s SLSA provenance, signed by ``key``."""
    if job.status not in slsa.FINISHED:
        raise ProvenanceUnavailable(f"job {job.id} is {job.status}: its provenance is issued "
                                    "once it finished")
    if not artifacts:
        raise ProvenanceUnavailable(f"job {job.id} has no artifacts, so no provenance")
    doc = slsa.statement(job, artifacts, slsa.builder_id(issuer))
    return dsse.sign(slsa.PAYLOAD_TYPE, slsa.payload(doc), key.private, key.keyid)


def check(raw: bytes, public_key: dsse.PublicKey, sha256: str) -> Verified:
    """Whether the envelope ``raw`` is signed by ``public_key``, holds a SLSA v1 statement,
    and names an artifact with this ``sha256`` (EnvelopeError saying what fails)."""
    payload_type, payload = dsse.open_envelope(raw, public_key)
    if payload_type != slsa.PAYLOAD_TYPE:
        raise dsse.EnvelopeError(f"the payload is {payload_type[:80]!r}, not an in-toto "
                                 "statement")
    try:
        doc = json.loads(payload)
        if doc["_type"] != slsa.STATEMENT_TYPE or doc["predicateType"] != slsa.PREDICATE_TYPE:
            raise dsse.EnvelopeError("the statement is not SLSA v1 provenance")
        subjects = [(str(s["name"]), s["digest"].get("sha256")) for s in doc["subject"]]
        run = doc["predicate"]["runDetails"]
        builder, invocation = str(run["builder"]["id"]), str(run["metadata"]["invocationId"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise dsse.EnvelopeError("the statement is malformed") from None
    name = next((n for n, digest in subjects if digest == sha256), None)
    if name is None:
        raise dsse.EnvelopeError(f"no subject of the statement has sha256 {sha256}")
    return Verified(name, builder, invocation)
