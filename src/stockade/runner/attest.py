"""What a runner agent proves about itself: its Ed25519 identity (kept on its host, 0600) and
its measurements, signed over a nonce of the control plane (scheme: ``api/attestation.py``)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stockade.api.attestation import code_digest, signed_bytes
from stockade.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from stockade.config import Settings
    from stockade.sandbox.interface import Backend


class Identity:
    """A runner's key pair and, once enrolled, its id at one server (``identity.json``)."""

    def __init__(self, directory: Path) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path = directory / "key.pem"
        try:
            if key_path.exists():
                key = serialization.load_pem_private_key(key_path.read_bytes(), None)
                if not isinstance(key, Ed25519PrivateKey):
                    raise ValueError("not an Ed25519 key")
            else:
                key = Ed25519PrivateKey.generate()
                pem = key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
                fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
        except (OSError, ValueError) as e:
            raise ConfigError(f"the runner key {key_path} cannot be used: {e}",
                              hint="move it away to enrol this runner anew") from e
        self._key: Ed25519PrivateKey = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        self.public_key = base64.b64encode(raw).decode()

    def sign(self, nonce: str, subject: str, measurements: dict[str, Any]) -> str:
        """The signature (base64) of an attestation."""
        data = signed_bytes(nonce, subject, self.public_key, measurements)
        return base64.b64encode(self._key.sign(data)).decode()

    def enrolled(self, server: str) -> str | None:
        """This runner's id at ``server`` (None if it has not enrolled there)."""
        try:
            saved = json.loads((self.directory / "identity.json").read_text())
        except (OSError, ValueError):
            return None
        if isinstance(saved, dict) and saved.get("server") == server \
                and saved.get("public_key") == self.public_key:
            return str(saved.get("runner_id"))
        return None

    def remember(self, server: str, runner_id: str) -> None:
        """Record the id ``server`` gave this runner."""
        path = self.directory / "identity.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"server": server, "runner_id": runner_id,
                                   "public_key": self.public_key}))
        os.replace(tmp, path)


def measure(settings: Settings, backend: Backend) -> dict[str, Any]:
    """The runner's measurements: its code, sandbox backend and runtime, seccomp filter,
    doctor, kernel."""
    from stockade.sandbox.seccomp import load_bpf

    findings = backend.check()
    runtime = next((f.detail for f in findings if f.control == "sandbox runtime"),
                   "unavailable")
    try:
        seccomp = hashlib.sha256(load_bpf(settings.cache_dir)).hexdigest()
    except Exception as e:
        seccomp = f"unavailable: {e}"[:200]
    return {
        "stockade_sha256": code_digest(),
        "bwrap_version": runtime,  # the name predates other backends: their runtime's too
        "sandbox_backend": backend.name,
        "seccomp_sha256": seccomp,
        "doctor": [{"control": f.control, "ok": f.ok, "required": f.required,
                    "detail": f.detail[:300]} for f in findings],
        "kernel": os.uname().release,
        "python": platform.python_version(),
    }
