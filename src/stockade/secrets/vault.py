"""Encryption at rest: AES-256-GCM under a master key kept outside the database.

The master key is 32 random bytes in a 0600 file: ``$STOCKADE_HOME/master.key``, created on
first use, or the operator's own file (``STOCKADE_MASTER_KEY_FILE``), which must exist. Each
value gets a fresh 96-bit nonce; the secret's name and version are bound in as associated
data, so a ciphertext cannot be moved to another secret. The key id (a hash of the key) is
recorded with each ciphertext.
"""

import base64
import hashlib
import os
import stat
from pathlib import Path
from typing import NamedTuple

from stockade.errors import ConfigError, StoreError

_HEADER = "stockade-master-key-v1"


class Sealed(NamedTuple):
    """A ciphertext and what is needed to open it."""

    key_id: str
    nonce: bytes
    ciphertext: bytes


class Vault:
    """Seals and opens secret values with the master key."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(b"stockade-key-id\0" + key).hexdigest()[:16]

    @classmethod
    def open(cls, path: Path, create: bool) -> "Vault":
        """The vault of the master key at ``path`` (created 0600 if ``create`` and missing)."""
        if not path.exists():
            if not create:
                raise ConfigError(f"master key file {path} does not exist",
                                  hint="create it or unset STOCKADE_MASTER_KEY_FILE")
            _create(path)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"master key file {path} is readable by others",
                              hint=f"chmod 600 {path}")
        text = path.read_text().split()
        if len(text) != 2 or text[0] != _HEADER:
            raise ConfigError(f"{path} is not a stockade master key file",
                              hint=f"it must read '{_HEADER} <base64 of 32 bytes>'")
        key = base64.b64decode(text[1])
        if len(key) != 32:
            raise ConfigError(f"{path}: the master key must be 32 bytes (AES-256)")
        return cls(key)

    def seal(self, name: str, version: int, value: bytes) -> Sealed:
        """Encrypt ``value`` for secret ``name`` at ``version``."""
        nonce = os.urandom(12)
        return Sealed(self.key_id, nonce, self._aead.encrypt(nonce, value, _aad(name, version)))

    def unseal(self, name: str, version: int, sealed: Sealed) -> bytes:
        """Decrypt; ``StoreError`` if it was sealed under another key or tampered with."""
        from cryptography.exceptions import InvalidTag

        if sealed.key_id != self.key_id:
            raise StoreError(f"secret {name} was encrypted with master key {sealed.key_id}, "
                             f"not the configured {self.key_id}",
                             hint="configure the master key it was stored with")
        try:
            return self._aead.decrypt(sealed.nonce, sealed.ciphertext, _aad(name, version))
        except InvalidTag:
            raise StoreError(f"secret {name} failed authentication: the stored ciphertext "
                             "was altered", hint="set the secret again") from None


def _aad(name: str, version: int) -> bytes:
    return f"stockade-secret\0{name}\0{version}".encode()


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{_HEADER} {base64.b64encode(os.urandom(32)).decode()}\n")
