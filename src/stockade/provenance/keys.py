"""The control plane's provenance signing key: Ed25519, made once and kept in the control
plane's database (shared by every server replica; the database is root's, 0600 for SQLite,
and never mounted into a sandbox). Its ``keyid`` is the sha256 of the raw public key;
``stockade provenance --public-key`` prints the public half for verifiers."""

from __future__ import annotations

import hashlib
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from stockade.errors import UsageError
from stockade.provenance.dsse import PublicKey
from stockade.store.interface import Store

SECRET_NAME = "provenance-ed25519"


class SigningKey:
    """An Ed25519 key from its 32-byte seed."""

    def __init__(self, seed: bytes) -> None:
        self.private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        raw = self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                     serialization.PublicFormat.Raw)
        self.keyid = hashlib.sha256(raw).hexdigest()

    def public_pem(self) -> str:
        """The public key, PEM (SubjectPublicKeyInfo)."""
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def signing_key(store: Store) -> SigningKey:
    """The control plane's key (made on first use)."""
    return SigningKey(store.server_secret(SECRET_NAME, lambda: os.urandom(32)))


def load_public_key(data: bytes, source: str) -> PublicKey:
    """An Ed25519 or ECDSA P-256 public key from PEM ``data`` (UsageError naming ``source``)."""
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise UsageError(f"{source} is not a PEM public key",
                         hint="pass the file `stockade provenance --public-key` printed") from None
    if isinstance(key, ed25519.Ed25519PublicKey) or (
            isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"):
        return key
    raise UsageError(f"{source} is neither an Ed25519 nor an ECDSA P-256 public key",
                     hint="provenance is signed with Ed25519 (or ECDSA P-256) keys")
