"""DSSE envelopes (https://github.com/secure-systems-lab/dsse, protocol v1): the signature is
over the pre-authentication encoding ``PAE(payloadType, payload)``, never over the JSON, so a
verifier checks exactly the bytes it then parses."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024


class EnvelopeError(ValueError):
    """An envelope that is malformed or whose signature does not verify."""


class NotSignedBy(EnvelopeError):
    """A well-formed envelope none of whose signatures the key made."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """The pre-authentication encoding of DSSE v1."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign(payload_type: str, payload: bytes, key: ed25519.Ed25519PrivateKey,
         keyid: str) -> dict[str, Any]:
    """An envelope of ``payload`` with one Ed25519 signature by ``key``."""
    sig = key.sign(pae(payload_type, payload))
    return {"payloadType": payload_type, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": keyid, "sig": base64.b64encode(sig).decode()}]}


def open_envelope(raw: bytes, public_key: PublicKey) -> tuple[str, bytes]:
    """``(payloadType, payload)`` of an envelope one of whose signatures ``public_key`` made
    (Ed25519, or ECDSA with SHA-256); EnvelopeError otherwise."""
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f"the envelope is larger than {MAX_ENVELOPE_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise EnvelopeError(f"the envelope is not JSON ({str(e)[:100]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("payloadType"), str) \
            or not isinstance(doc.get("payload"), str) \
            or not isinstance(doc.get("signatures"), list):
        raise EnvelopeError("not a DSSE envelope (payloadType, payload and signatures needed)")
    try:
        payload = base64.b64decode(doc["payload"], validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError("the envelope's payload is not base64") from None
    message = pae(doc["payloadType"], payload)
    for entry in doc["signatures"][:64]:
        try:
            sig = base64.b64decode(entry["sig"], validate=True)
        except (binascii.Error, ValueError, TypeError, KeyError):
            continue
        if _verifies(public_key, sig, message):
            return doc["payloadType"], payload
    raise NotSignedBy("no signature of the envelope verifies under the key")


def _verifies(key: PublicKey, sig: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, message)
        else:
            key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
