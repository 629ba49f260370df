"""The control plane over HTTP, as a runner agent sees it: the same :class:`ControlPlane` the
in-process runner uses, plus the agent's own calls (heartbeats, log chunks, artifacts).

Sessions: the agent attests (``runner/attest.py``) for a session token and attests again
before it ends, or at once when the server says the session is gone. A call that cannot reach
the server (it restarts, the network hiccups) is retried with backoff; what the server refuses
(4xx) is not.
"""

from __future__ import annotations

import base64
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stockade.api.protocol import Assignment, Completion
from stockade.errors import InfrastructureError, PolicyDenied

if TYPE_CHECKING:
    import httpx

    from stockade.runner.attest import Identity

RETRY_FOR_S = 600.0  # keep trying an unreachable server this long (a restart, a failover)
BUSY_FOR_S = 30.0  # an enrolment the server is too busy for is tried again this long


class Refused(Exception):
    """The server answered 4xx: ``status`` and its ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


class Unreachable(Exception):
    """The server did not answer (after the retries)."""


class Session:
    """The agent's current session token, renewed by attesting again."""

    def __init__(self, server: str, identity: Identity,
                 measure: Callable[[], dict[str, Any]], verify: bool | str = True) -> None:
        self.server, self.identity, self.measure, self.verify = server, identity, measure, verify
        self.runner_id: str | None = identity.enrolled(server)
        self.token = ""
        self.expires_at = 0.0
        self.heartbeat_s, self.lease_s = 2.0, 30.0
        self._lock = threading.Lock()
        self._local = threading.local()

    def client(self) -> httpx.Client:
        """This thread's HTTP client (keep-alive connections are per thread)."""
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            import httpx

            client = httpx.Client(base_url=self.server, verify=self.verify,
                                  timeout=httpx.Timeout(45.0, connect=5.0))
            self._local.client = client
        return client

    def _post_plain(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST without a session (enrolment); a server busy with others (503, which it
        answers before any work) is asked again for up to :data:`BUSY_FOR_S`."""
        import httpx

        pauses = _pauses(BUSY_FOR_S)
        while True:
            try:
                response = self.client().post(path, json=body)
            except httpx.HTTPError as e:
                raise Unreachable(str(e)) from e
            if response.status_code != 503 or not next(pauses, False):
                break
        if response.status_code >= 500:
            raise Unreachable(f"{response.status_code} from {path}")
        if response.status_code >= 400:
            raise Refused(response.status_code, _detail(response))
        data: dict[str, Any] = response.json()
        return data

    def attest(self, enrol_token: str | None = None, name: str = "", labels: tuple[str, ...] = (),
               concurrency: int = 1) -> None:
        """Enrol (with ``enrol_token``, if this runner has no id at the server yet) or attest
        again; either way a fresh session."""
        measurements = self.measure()
        nonce = self._post_plain("/api/v1/enrol/nonce", {})["nonce"]
        if self.runner_id is None:
            if not enrol_token:
                raise Refused(401, "this runner is not enrolled: pass --enrol-token")
            token_id = enrol_token.removeprefix("stke_").split("_")[0]
            out = self._post_plain("/api/v1/enrol", {
                "token": enrol_token, "nonce": nonce, "public_key": self.identity.public_key,
                "name": name, "labels": list(labels), "concurrency": concurrency,
                "measurements": measurements,
                "signature": self.identity.sign(nonce, token_id, measurements)})
            self.identity.remember(self.server, out["runner_id"])
        else:
            out = self._post_plain("/api/v1/enrol/attest", {
                "runner_id": self.runner_id, "nonce": nonce, "measurements": measurements,
                "signature": self.identity.sign(nonce, self.runner_id, measurements)})
        with self._lock:
            self.runner_id, self.token = out["runner_id"], out["token"]
            self.expires_at = time.time() + (out["expires_at"] - time.time())
            self.heartbeat_s, self.lease_s = out["heartbeat_s"], out["lease_s"]

    def due(self) -> bool:
        """Whether the session is past half its life (time to attest again)."""
        return time.time() > self.expires_at - 0.5 * max(60.0, self.expires_at - time.time())

    def call(self, method: str, path: str, retry_for: float = RETRY_FOR_S,
             **kwargs: Any) -> httpx.Response:
        """A runner request with the session token: retried while the server is unreachable
        or answers 5xx or 408 (the request did not arrive in time: a slow link) for up to
        ``retry_for`` seconds, attested again once on 401; a Refused for other 4xx. (Every
        runner request may be sent again: a completion sent again is answered as the first.)"""
        import httpx

        pauses, renewed = _pauses(retry_for), False
        extra = kwargs.pop("headers", {})
        while True:
            try:
                response = self.client().request(
                    method, path, headers={**extra, "Authorization": f"Bearer {self.token}"},
                    **kwargs)
            except httpx.HTTPError as e:
                problem = str(e) or type(e).__name__
            else:
                if response.status_code == 401 and not renewed:
                    renewed = True
                    self.attest()
                    continue
                if response.status_code < 500 and response.status_code != 408:
                    if response.status_code >= 400:
                        raise Refused(response.status_code, _detail(response))
                    return response
                problem = f"{response.status_code} from the server"
            if not next(pauses, False):
                raise Unreachable(problem)


def _pauses(retry_for: float) -> Iterator[bool]:
    """A pause before each try again (jittered, doubling from 0.2 s to 5 s), True after it,
    while ``retry_for`` seconds from now are not up."""
    deadline, delay = time.monotonic() + retry_for, 0.2
    while time.monotonic() + delay <= deadline:
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 5.0)
        yield True


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", "")
    except ValueError:
        detail = response.text
    return str(detail)[:500]


class _FileBody:
    """A file's bytes as an iterable body that starts over at each iteration (each try)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            while chunk := f.read(1024 * 1024):
                yield chunk


class RemoteControl:
    """A :class:`~stockade.api.protocol.ControlPlane` over a runner session."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._attempts: dict[str, int] = {}  # job -> the attempt this agent runs

    def claim(self, runner_id: str, labels: tuple[str, ...],
              job_id: str | None = None, wait_s: float = 25.0) -> Assignment | None:
        """The next job for this runner, waiting up to ``wait_s`` for one."""
        from stockade.api.wire import AssignmentOut

        response = self.session.call("POST", "/api/v1/runner/claim", params={"wait": wait_s},
                                     retry_for=wait_s + 30)
        if response.status_code == 204:
            return None
        out = AssignmentOut.model_validate_json(response.content)
        self._attempts[out.job_id] = out.attempt
        return out.assignment()

    def _path(self, job_id: str, attempt: int, what: str) -> str:
        return f"/api/v1/runner/jobs/{job_id}/{attempt}/{what}"

    def redeem(self, lease_id: str, job_id: str, attempt: int, runner_id: str) -> bytes:
        """A secret's value (PolicyDenied if the server refuses it)."""
        try:
            response = self.session.call("POST", self._path(job_id, attempt, "redeem"),
                                         retry_for=60, json={"lease_id": lease_id})
        except Refused as e:
            raise PolicyDenied(e.detail) from e
        except Unreachable as e:
            raise InfrastructureError(f"the control plane is unreachable: {e}") from e
        return base64.b64decode(response.json()["value"])

    def mint_id_token(self, job_id: str, attempt: int, runner_id: str) -> str:
        """A fresh ID token for the attempt."""
        try:
            response = self.session.call("POST", self._path(job_id, attempt, "id-token"),
                                         retry_for=60)
        except Refused as e:
            raise PolicyDenied(e.detail) from e
        except Unreachable as e:
            raise InfrastructureError(f"the control plane is unreachable: {e}") from e
        return str(response.json()["token"])

    def report(self, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Audit events the attempt observed (lost, not fatal, if the server refuses them)."""
        attempt = self._attempts.get(job_id)
        if attempt is None or not events:
            return
        for start in range(0, len(events), 256):
            try:
                self.session.call("POST", self._path(job_id, attempt, "report"),
                                  json={"events": [list(e) for e in events[start:start + 256]]})
            except (Refused, Unreachable):
                return

    def complete(self, completion: Completion) -> bool:
        """Record the attempt; False if it no longer holds the job (fenced)."""
        return self.complete_and_claim(completion, take_next=False)[0]

    def complete_and_claim(self, completion: Completion, take_next: bool = True
                           ) -> tuple[bool, Assignment | None]:
        """Record the attempt (False if fenced) and, in the same request, claim this runner's
        next job if one is queued for it (one round trip per job on a busy queue)."""
        from stockade.api.wire import CompletedOut, CompletionIn

        body = CompletionIn.of(completion).model_dump(mode="json")
        try:
            response = self.session.call(
                "POST", self._path(completion.job_id, completion.attempt, "complete"),
                params={"next": "true"} if take_next else None, json=body)
        except Refused as e:
            if e.status == 409:
                return False, None
            raise InfrastructureError(f"the server refused the completion: {e.detail}") from e
        except Unreachable as e:
            raise InfrastructureError(f"the control plane is unreachable: {e}") from e
        finally:
            self._attempts.pop(completion.job_id, None)
        out = CompletedOut.model_validate_json(response.content).next
        if out is None:
            return True, None
        self._attempts[out.job_id] = out.attempt
        return True, out.assignment()

    def heartbeat(self, job_id: str, attempt: int) -> tuple[bool, bool]:
        """``(held, cancel)``; held is False once the server gave the job to another attempt.
        Raises Unreachable if the server does not answer within a heartbeat or so."""
        try:
            response = self.session.call("POST", self._path(job_id, attempt, "heartbeat"),
                                         retry_for=self.session.heartbeat_s)
        except Refused as e:
            if e.status == 409:
                return False, False
            raise
        data = response.json()
        return bool(data["held"]), bool(data["cancel"])

    def put_log(self, job_id: str, attempt: int, seq: int, data: bytes) -> str:
        """Upload one log chunk: ``stored``/``duplicate``, or ``fenced``/``full``."""
        try:
            response = self.session.call("PUT", self._path(job_id, attempt, f"log/{seq}"),
                                         content=data)
        except Refused as e:
            return "full" if e.status == 413 else "fenced"
        return str(response.json()["state"])

    def put_artifact(self, job_id: str, attempt: int, sha256: str, path: Path) -> None:
        """Upload one artifact's bytes, streamed from ``path`` (read afresh on a retry)."""
        self.session.call("PUT", self._path(job_id, attempt, f"artifacts/{sha256}"),
                          content=_FileBody(path),
                          headers={"Content-Length": str(path.stat().st_size)})

    def workspace(self, job_id: str, attempt: int) -> bytes:
        """The job's workspace archive."""
        return self.session.call("GET", self._path(job_id, attempt, "workspace")).content
