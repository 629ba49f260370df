"""Keeping a job's OIDC ID token fresh: mint at start, then again well before it expires."""

from __future__ import annotations

import threading

from stockade.api.protocol import Assignment, ControlPlane
from stockade.sandbox.interface import Sandbox
from stockade.secrets.redact import Masker


class TokenRefresher:
    """Publishes a fresh token into the sandbox every ``interval`` seconds until closed."""

    def __init__(self, control: ControlPlane, a: Assignment, runner_id: str, sandbox: Sandbox,
                 masker: Masker, interval: float) -> None:
        self.control = control
        self.a = a
        self.runner_id = runner_id
        self.sandbox = sandbox
        self.masker = masker
        self.interval = interval
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._publish()  # the first token exists before the first step starts
        self._thread = threading.Thread(target=self._loop, daemon=True, name="id-token")
        self._thread.start()

    def _publish(self) -> None:
        token = self.control.mint_id_token(self.a.job_id, self.a.attempt, self.runner_id)
        self.masker.add(token.encode(), name="id_token")  # a bearer credential: never logged
        self.sandbox.publish_identity_token(token)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._publish()
            except Exception as e:  # keep the job running; the old token is still valid
                self.errors.append(f"{type(e).__name__}: {e}")

    def close(self) -> None:
        """Stop refreshing."""
        self._stop.set()
        self._thread.join(timeout=10)
