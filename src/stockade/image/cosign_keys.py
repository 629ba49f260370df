"""cosign's key files: ECDSA P-256 key pairs as ``cosign generate-key-pair`` writes them.

The public key (``cosign.pub``) is PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo). The private key
(``cosign.key``) is PEM ``ENCRYPTED SIGSTORE PRIVATE KEY`` (older cosign: ``ENCRYPTED COSIGN
PRIVATE KEY``) whose body is the JSON of go-securesystemslib's ``encrypted`` package::

    {"kdf":{"name":"scrypt","params":{"N":65536,"r":8,"p":1},"salt":"<32 bytes, base64>"},
     "cipher":{"name":"nacl/secretbox","nonce":"<24 bytes, base64>"},
     "ciphertext":"<base64 of secretbox(PKCS#8 DER of the key)>"}

(one line, fields in that order: Go's ``json.Marshal`` of its structs). The secretbox key is
scrypt(password, salt, N, r, p) of 32 bytes. As go-securesystemslib does, only its three
parameter sets (legacy 2^15, standard 2^16, OWASP 2^17; r=8, p=1) are accepted: a key file
naming others could make the reader spend any memory and time. Keys we write use the standard
set, as cosign does. Everything read is bounded and checked; a key file is the user's input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stockade.errors import UsageError

PRIVATE_TYPES = ("ENCRYPTED SIGSTORE PRIVATE KEY", "ENCRYPTED COSIGN PRIVATE KEY")
MAX_KEY_FILE = 64 * 1024
SCRYPT_PARAMS = ((32768, 8, 1), (65536, 8, 1), (131072, 8, 1))  # legacy, standard, OWASP
WRITTEN_PARAMS = (65536, 8, 1)
SALT_BYTES, NONCE_BYTES, BOX_KEY_BYTES = 32, 24, 32
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,64})-----\r?\n([A-Za-z0-9+/=\r\n]{1,65536}?)"
                  rb"\r?\n?-----END \1-----")
_KEY_HINT = "use a key file from `stockade image generate-key-pair` or `cosign generate-key-pair`"


class KeyFileError(UsageError):
    """A key file that cannot be read, is not a key of the right kind, or whose password is
    wrong: the user's mistake (exit 2), named with the fix."""


class PublicKey(NamedTuple):
    """A public key that signatures are checked with."""

    key: ec.EllipticCurvePublicKey
    fingerprint: str  # sha256:<hex> of its SubjectPublicKeyInfo (DER)
    source: str  # where it came from (a path), for messages

    def verifies(self, signature: bytes, payload: bytes) -> bool:
        """Whether ``signature`` (ASN.1 DER ECDSA, SHA-256) is this key's over ``payload``."""
        try:
            self.key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def describe(self) -> str:
        """``SOURCE (sha256:abcd…)``: how messages name it."""
        return f"{self.source} ({self.fingerprint[:19]}…)"


def public_key(key: ec.EllipticCurvePublicKey, source: str) -> PublicKey:
    """``key`` with its fingerprint."""
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return PublicKey(key, "sha256:" + hashlib.sha256(der).hexdigest(), source)


def read_key_file(path: str) -> bytes:
    """The bytes of key file ``path`` (at most :data:`MAX_KEY_FILE`)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path!r}: {e.strerror}",
                           hint=_KEY_HINT) from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{path!r} is larger than a key file", hint=_KEY_HINT)
    return data


def load_public_key(data: bytes, source: str) -> PublicKey:
    """An ECDSA P-256 public key from PEM ``data`` (KeyFileError naming ``source``)."""
    kind, der = _pem_block(data, source)
    try:
        key = serialization.load_der_public_key(der) if kind == "PUBLIC KEY" else None
    except (ValueError, TypeError, UnsupportedAlgorithm):  # (a curve it does not know, too)
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise KeyFileError(f"{source} is not an ECDSA P-256 public key (PEM PUBLIC KEY)",
                           hint="pass the .pub file of the key pair (cosign's default keys "
                                "are ECDSA P-256)")
    return public_key(key, source)


def load_private_key(data: bytes, password: bytes, source: str) -> ec.EllipticCurvePrivateKey:
    """The ECDSA P-256 key in cosign key file ``data`` (KeyFileError naming ``source``; a
    wrong password says so)."""
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    kind, body = _pem_block(data, source)
    if kind not in PRIVATE_TYPES:
        raise KeyFileError(f"{source} is a PEM {kind!r}, not a cosign private key "
                           f"({PRIVATE_TYPES[0]})",
                           hint="import other keys with `cosign import-key-pair`")
    der = decrypt(body, password, source)
    try:
        key = load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise KeyFileError(f"{source} does not hold an ECDSA P-256 private key",
                           hint=_KEY_HINT)
    return key


def private_pem(key: ec.EllipticCurvePrivateKey, password: bytes) -> bytes:
    """``key`` as an encrypted cosign key file (``ENCRYPTED SIGSTORE PRIVATE KEY``)."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return _pem_encode(PRIVATE_TYPES[0], encrypt(der, password))


def public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    """``key`` as a ``cosign.pub`` file (PEM SubjectPublicKeyInfo)."""
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key_pair(prefix: Path, password: bytes) -> tuple[Path, Path]:
    """Write a new key pair to ``PREFIX.key`` (0600) and ``PREFIX.pub``; neither may exist
    (KeyFileError otherwise, and nothing is written)."""
    private, public = key_pair_paths(prefix)
    key = ec.generate_private_key(ec.SECP256R1())
    _write_new(private, private_pem(key, password), 0o600)
    try:
        _write_new(public, public_pem(key.public_key()), 0o644)
    except BaseException:
        private.unlink()
        raise
    return private, public


def key_pair_paths(prefix: Path) -> tuple[Path, Path]:
    """``PREFIX.key`` and ``PREFIX.pub`` (KeyFileError if either exists)."""
    private, public = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for path in (private, public):
        if os.path.lexists(path):
            raise KeyFileError(f"{path} exists: not overwritten",
                               hint="remove it or pass another --output-key-prefix")
    return private, public


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never through a link, never over a file) holding ``data``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
    except OSError as e:
        raise KeyFileError(f"cannot create {path}: {e.strerror}",
                           hint="choose a writable directory with --output-key-prefix") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # (whatever the umask)
        f.write(data)


# -- go-securesystemslib's encrypted format ---------------------------------------------------

def encrypt(plaintext: bytes, password: bytes, params: tuple[int, int, int] = WRITTEN_PARAMS
            ) -> bytes:
    """``plaintext`` sealed with a key scrypt derives from ``password``: the JSON document
    go-securesystemslib's ``encrypted.Encrypt`` writes (same fields, same order)."""
    import nacl.secret

    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    box = nacl.secret.SecretBox(_scrypt(password, salt, params))
    sealed = box.encrypt(plaintext, nonce).ciphertext  # (tag + ciphertext, as Go's Seal)
    doc = {"kdf": {"name": "scrypt", "params": dict(zip("Nrp", params, strict=True)),
                   "salt": _b64(salt)},
           "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)},
           "ciphertext": _b64(sealed)}
    return json.dumps(doc, separators=(",", ":")).encode()


def decrypt(document: bytes, password: bytes, source: str = "the key") -> bytes:
    """What ``document`` (see :func:`encrypt`) seals (KeyFileError if it is malformed, names
    other parameters or the password is wrong)."""
    import nacl.exceptions
    import nacl.secret

    salt, params, nonce, sealed = _parse_sealed(document, source)
    box = nacl.secret.SecretBox(_scrypt(password, salt, params))
    try:
        return box.decrypt(sealed, nonce)
    except nacl.exceptions.CryptoError:
        raise KeyFileError(f"wrong password for {source} (or the key file is damaged)",
                           hint="give the password the key was made with (COSIGN_PASSWORD "
                                "or the prompt)") from None


def _parse_sealed(document: bytes, source: str) -> tuple[bytes, tuple[int, int, int], bytes,
                                                          bytes]:
    """``(salt, scrypt parameters, nonce, sealed bytes)``, every field checked."""
    try:
        doc = json.loads(document, object_pairs_hook=_no_duplicates)
        kdf, cipher = doc["kdf"], doc["cipher"]
        fields_ok = (set(doc) == {"kdf", "cipher", "ciphertext"}
                     and set(kdf) == {"name", "params", "salt"}
                     and set(cipher) == {"name", "nonce"} and set(kdf["params"]) == set("Nrp"))
        params = tuple(kdf["params"][k] for k in "Nrp")
        salt, nonce = _unb64(kdf["salt"]), _unb64(cipher["nonce"])
        sealed = _unb64(doc["ciphertext"])
    except (ValueError, RecursionError, KeyError, TypeError, binascii.Error):
        fields_ok = False
    if not fields_ok or kdf["name"] != "scrypt" or cipher["name"] != "nacl/secretbox":
        raise KeyFileError(f"{source} is not an encrypted cosign key (scrypt + "
                           "nacl/secretbox)", hint=_KEY_HINT)
    if any(type(n) is not int for n in params) or params not in SCRYPT_PARAMS:
        raise KeyFileError(f"{source} names scrypt parameters cosign does not use",
                           hint=_KEY_HINT)
    if not 1 <= len(salt) <= 1024 or len(nonce) != NONCE_BYTES or len(sealed) < 16:
        raise KeyFileError(f"{source}: its salt, nonce or ciphertext has a wrong size",
                           hint=_KEY_HINT)
    n, r, p = params
    return salt, (n, r, p), nonce, sealed


def _scrypt(password: bytes, salt: bytes, params: tuple[int, int, int]) -> bytes:
    n, r, p = params
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=BOX_KEY_BYTES,
                          maxmem=256 * 1024 * 1024)


def _pem_block(data: bytes, source: str) -> tuple[str, bytes]:
    """``(type, decoded body)`` of the first PEM block in ``data``."""
    found = _PEM.search(data)
    body = None
    if found is not None:
        try:
            body = base64.b64decode(re.sub(rb"\r?\n", b"", found.group(2)), validate=True)
        except binascii.Error:
            body = None
    if found is None or body is None:
        raise KeyFileError(f"{source} is not a PEM key file", hint=_KEY_HINT)
    return found.group(1).decode(), body


def _pem_encode(kind: str, body: bytes) -> bytes:
    """PEM as Go's ``pem.EncodeToMemory`` writes it (64 characters a line)."""
    text = base64.b64encode(body).decode()
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return "\n".join([f"-----BEGIN {kind}-----", *lines, f"-----END {kind}-----", ""]).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("a key appears twice")
    return doc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise TypeError("not a string")
    return base64.b64decode(text, validate=True)
