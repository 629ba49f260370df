"""A runner agent played by the test itself, over real HTTP: a real Ed25519 key, measurements
made by hand (the server under test accepts any code digest: ``ANY_CODE``), and the runner
routes called one by one, so that a test decides exactly which log chunks, artifacts and
completions a job gets."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade.api.attestation import signed_bytes

# server settings under which the hand-made measurements pass the attestation policy
ANY_CODE = {"STOCKADE_ATTEST_STOCKADE_DIGESTS": "*",
            "STOCKADE_ATTEST_REQUIRED_CONTROLS": "namespaces"}

MEASUREMENTS = {
    "stockade_sha256": "0" * 64, "bwrap_version": "bubblewrap 0.8.0",
    "seccomp_sha256": "1" * 64, "kernel": "6.1.0", "python": "3.11",
    "doctor": [{"control": "namespaces", "required": False, "ok": True}],
}


class FakeRunner:
    """One enrolled runner: ``claim``, ``log``, ``artifact``, ``complete``, ``heartbeat``."""

    def __init__(self, url: str, enrol_token: str, name: str = "fake",
                 labels: tuple[str, ...] = ()) -> None:
        self.http = httpx.Client(base_url=url, timeout=60)
        self.key = Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw,
                                                 serialization.PublicFormat.Raw)
        self.public_key = base64.b64encode(raw).decode()
        nonce = self.http.post("/api/v1/enrol/nonce").json()["nonce"]
        token_id = enrol_token.removeprefix("stke_").split("_")[0]
        answer = self.http.post("/api/v1/enrol", json={
            "token": enrol_token, "nonce": nonce, "public_key": self.public_key, "name": name,
            "labels": list(labels), "concurrency": 1, "measurements": MEASUREMENTS,
            "signature": self._sign(nonce, token_id)})
        assert answer.status_code == 200, answer.text
        session = answer.json()
        self.runner_id: str = session["runner_id"]
        self.http.headers["Authorization"] = f"Bearer {session['token']}"

    def _sign(self, nonce: str, subject: str) -> str:
        data = signed_bytes(nonce, subject, self.public_key, MEASUREMENTS)
        return base64.b64encode(self.key.sign(data)).decode()

    def claim(self, wait: float = 5.0) -> dict[str, Any]:
        """The next job (fails the test if none comes within ``wait``)."""
        answer = self.http.post("/api/v1/runner/claim", params={"wait": wait})
        assert answer.status_code == 200, (answer.status_code, answer.text)
        return dict(answer.json())

    def _job(self, a: dict[str, Any]) -> str:
        return f"/api/v1/runner/jobs/{a['job_id']}/{a['attempt']}"

    def log(self, a: dict[str, Any], seq: int, data: bytes) -> int:
        """Send log chunk ``seq``; the status code."""
        return self.http.put(f"{self._job(a)}/log/{seq}", content=data).status_code

    def artifact(self, a: dict[str, Any], data: bytes) -> str:
        """Upload an artifact's bytes; their sha256."""
        digest = hashlib.sha256(data).hexdigest()
        answer = self.http.put(f"{self._job(a)}/artifacts/{digest}", content=data)
        assert answer.status_code == 201, answer.text
        return digest

    def heartbeat(self, a: dict[str, Any]) -> dict[str, Any]:
        """A heartbeat's answer (``held``, ``cancel``)."""
        answer = self.http.post(f"{self._job(a)}/heartbeat")
        return {"status": answer.status_code, **(answer.json() if answer.is_success else {})}

    def workspace(self, a: dict[str, Any]) -> bytes:
        """The job's workspace archive, as the server hands it out."""
        answer = self.http.get(f"{self._job(a)}/workspace")
        assert answer.status_code == 200, answer.text
        return answer.content

    def complete(self, a: dict[str, Any], status: str = "succeeded",
                 artifacts: list[dict[str, Any]] | None = None, **fields: Any) -> int:
        """Report the attempt finished; the status code."""
        body = {"status": status, "duration_s": 0.5, "artifacts": artifacts or [],
                "steps": [{"name": "a", "status": status if status != "error" else "error",
                           "exit_code": 0 if status == "succeeded" else 1,
                           "duration_s": 0.4}], **fields}
        if status == "failed":
            body.setdefault("failure_reason", "script_failure")
        return self.http.post(f"{self._job(a)}/complete", content=json.dumps(body),
                              headers={"content-type": "application/json"}).status_code

    def close(self) -> None:
        """Close the connections."""
        self.http.close()
