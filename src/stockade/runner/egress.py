"""The runner's side of egress: start the job's proxy, log denials once, kill on violation."""

from __future__ import annotations

import threading
from pathlib import Path

from stockade.api.protocol import Assignment, ControlPlane, EgressRecord
from stockade.config import Settings
from stockade.egress.policy import Policy
from stockade.egress.proxy import JobProxy, Limits
from stockade.egress.resolver import HostsFileResolver, Resolver, SystemResolver
from stockade.runner.logs import JobLog
from stockade.sandbox.interface import Sandbox
from stockade.spec import Job

REPORT_INTERVAL_S = 0.5


def resolver_for(settings: Settings) -> Resolver:
    """The resolver from the runner's settings (never from a job spec)."""
    if settings.egress_hosts_file:
        return HostsFileResolver(Path(settings.egress_hosts_file))
    return SystemResolver()


class EgressSession:
    """The proxy of one job and what it decided."""

    def __init__(self, settings: Settings, spec: Job, sandbox: Sandbox, log: JobLog,
                 control: ControlPlane, a: Assignment) -> None:
        listener = sandbox.egress_listener
        assert listener is not None
        self.control = control
        self.a = a
        self._unreported: list[EgressRecord] = []
        self._stop = threading.Event()
        self.spec = spec
        self.sandbox = sandbox
        self.log = log
        self.records: list[EgressRecord] = []
        self.violated = False
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        limits = Limits(max_connections=settings.egress_max_connections,
                        header_timeout_s=settings.egress_header_timeout_s,
                        idle_timeout_s=settings.egress_idle_timeout_s)
        self.proxy = JobProxy(Policy.from_spec(spec.egress.mode, spec.egress.allow),
                              resolver_for(settings), listener, self._decided, limits)
        self.proxy.start()
        self._reporter = threading.Thread(target=self._report_loop, daemon=True,
                                          name="egress-audit")
        self._reporter.start()

    def _report_loop(self) -> None:
        """Write decisions to the audit trail as they happen (in batches, off the proxy)."""
        while not self._stop.wait(REPORT_INTERVAL_S):
            self._report()

    def _report(self) -> None:
        with self._lock:
            batch, self._unreported = self._unreported, []
        if batch:
            self.control.report(self.a.job_id, [(r.action, r.audit_detail(self.a.attempt))
                                                for r in batch])

    def _decided(self, record: EgressRecord) -> None:
        """Called from the proxy's thread for every connection attempt."""
        with self._lock:
            self.records.append(record)
            self._unreported.append(record)
            first = record.destination not in self._logged
            self._logged.add(record.destination)
        if record.allowed and not record.audit_only:
            return
        if first:
            verb = "would be denied (audit)" if record.allowed else "denied"
            self.log.note(f"egress {verb}: {record.destination}: {record.reason}")
        if not record.allowed and self.spec.egress.on_violation == "kill" and not self.violated:
            self.violated = True
            self.log.note("egress violation: stopping the job (on_violation: kill)")
            self.sandbox.kill()

    def close(self) -> tuple[EgressRecord, ...]:
        """Stop the proxy, report what is left; every decision it made, in order."""
        self.proxy.stop()
        self._stop.set()
        self._reporter.join(timeout=10)
        self._report()
        with self._lock:
            return tuple(self.records)
