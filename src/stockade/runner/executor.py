"""The in-process runner: claim a job from the control plane, run it, report it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import BinaryIO

from stockade.api.protocol import Assignment, Completion, ControlPlane
from stockade.config import Settings
from stockade.errors import StockadeError
from stockade.runner.attempt import Attempt
from stockade.runner.logs import JobLog
from stockade.sandbox.interface import Backend, WorkspaceSource


class Runner:
    """An in-process runner that executes jobs it claims from a control plane. With
    ``canceled`` (whether a cancel of the job was requested: ``stockade cancel`` from another
    terminal), it looks every ``runner_heartbeat_s`` while a job runs, as a runner agent's
    heartbeat does, and stops the job when one was."""

    def __init__(self, settings: Settings, backend: Backend, control: ControlPlane,
                 runner_id: str, labels: tuple[str, ...] = (),
                 live: BinaryIO | None = None,
                 canceled: Callable[[str], bool] | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self.control = control
        self.runner_id = runner_id
        self.labels = labels
        self.live = live
        self.canceled = canceled

    def run_one(self, workspace: WorkspaceSource | None, job_id: str | None = None
                ) -> Completion | None:
        """Claim one job (``job_id`` if given), execute it, report it; None if none was queued."""
        assignment = self.control.claim(self.runner_id, self.labels, job_id)
        if assignment is None:
            return None
        completion = self.execute(assignment, workspace)
        if not self.control.complete(completion):
            raise StockadeError(f"job {assignment.job_id} is no longer leased to this runner")
        return completion

    def execute(self, a: Assignment, workspace: WorkspaceSource | None) -> Completion:
        """Run the assignment end to end; every failure becomes a reason, never an exception."""
        log = JobLog(self.settings.logs_dir / f"{a.job_id}.log", self.settings.log_cap_bytes,
                     self.live)
        attempt = Attempt(self.settings, self.backend, self.control, self.runner_id, a, log)
        if self.canceled is None:
            return attempt.run(workspace)
        over = threading.Event()
        watch = threading.Thread(target=self._watch, args=(a.job_id, attempt, over),
                                 daemon=True, name=f"cancel-watch-{a.job_id}")
        watch.start()
        try:
            return attempt.run(workspace)
        finally:
            over.set()
            watch.join()

    def _watch(self, job_id: str, attempt: Attempt, over: threading.Event) -> None:
        """Stop the attempt once a cancel of its job is requested (until ``over``)."""
        assert self.canceled is not None
        while not over.wait(max(0.2, self.settings.runner_heartbeat_s)):
            try:
                asked = self.canceled(job_id)
            except StockadeError:  # the state could not be read now: look again later
                continue
            if asked:
                attempt.cancel("canceled on request (stockade cancel)")
                return
