"""The runner's side of egress: start the job's proxy, log denials once, kill on violation,
and keep what a job's connection attempts leave behind bounded.

The policy is the spec's ``egress`` block plus the operator's internal destinations
(``egress_internal_allow``, which apply to every job of this runner); an ``untrusted`` job's
block is narrowed to what ``egress_untrusted_allow`` covers (admission refuses such a job
first; this is the second line).

Decisions are added up per destination and decision (count, first and last time, bytes). At
most ``egress_max_destinations`` destinations are kept, in the result and in the audit trail;
further ones are only counted, and the job's result and one ``egress.truncated`` audit event
say how many. Audit rows are rate-limited per job: the first decision on a destination reaches
the audit trail within half a second (a runner that dies loses none of them), repeats are
added up and written at most every :data:`REPEAT_INTERVAL_S` within a budget, and whatever is
left once more when the job ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stockade.api.protocol import Assignment, ControlPlane, EgressRecord
from stockade.config import Settings
from stockade.egress.admission import covered, untrusted_ceiling
from stockade.egress.policy import Policy, parse_rule
from stockade.egress.proxy import JobProxy, Limits
from stockade.egress.resolver import HostsFileResolver, Resolver, SystemResolver
from stockade.errors import ConfigError, SpecError
from stockade.rlimits import raise_open_files
from stockade.runner.logs import JobLog
from stockade.sandbox.interface import Sandbox
from stockade.spec import Job

REPORT_INTERVAL_S = 0.5
REPEAT_INTERVAL_S = 10.0
OVERFLOW_MEMORY = 65_536  # unrecorded destinations are told apart exactly up to this many

Key = tuple[str, bool, bool]  # destination, allowed, audit_only


def resolver_for(settings: Settings) -> Resolver:
    """The resolver from the runner's settings (never from a job spec)."""
    if settings.egress_hosts_file:
        return HostsFileResolver(Path(settings.egress_hosts_file))
    return SystemResolver()


def job_policy(settings: Settings, spec: Job, trust: str) -> tuple[Policy, list[str]]:
    """The job's policy and notes on what the runner narrowed (untrusted jobs only)."""
    mode, allow, notes = spec.egress.mode, spec.egress.allow, list[str]()
    if trust == "untrusted":
        mode, allow, notes = untrusted_ceiling(mode, allow, settings.egress_untrusted_allow)
    try:
        rules = tuple(parse_rule(entry) for entry in allow)
    except ValueError as e:
        raise SpecError("the job's egress.allow", [str(e)[:300]]) from e
    try:
        internal = tuple(parse_rule(e, operator=True) for e in settings.egress_internal_allow)
        ceiling = tuple(parse_rule(e, operator=True) for e in settings.egress_untrusted_allow)
    except ValueError as e:
        raise ConfigError(f"egress_internal_allow or egress_untrusted_allow: {e}",
                          hint="write CIDR:port entries, e.g. 10.1.2.0/24:5432") from e
    if trust == "untrusted":  # internal destinations too: only what untrusted work may reach
        internal = tuple(r for r in internal if any(covered(r, by) for by in ceiling))
    return Policy(mode, rules + internal), notes


def merge(a: EgressRecord, b: EgressRecord) -> EgressRecord:
    """Two records of one destination and decision, added up (``b`` is the later one)."""
    return a._replace(attempts=a.attempts + b.attempts,
                      last_at=max(a.last_at or a.at, b.last_at or b.at),
                      address=b.address or a.address, bytes_up=a.bytes_up + b.bytes_up,
                      bytes_down=a.bytes_down + b.bytes_down,
                      duration_s=a.duration_s + b.duration_s)


def audit_row(record: EgressRecord, attempt: int) -> tuple[str, dict[str, Any]]:
    """The audit event of an (aggregated) record."""
    detail = record.audit_detail(attempt)
    detail.update(count=record.attempts, last_at=record.last_at or record.at)
    return record.action, detail


class Tally:
    """One destination and decision, added up: in total, and since the last audit row."""

    def __init__(self, record: EgressRecord) -> None:
        self.total = record
        self.pending: EgressRecord | None = record
        self.announced = False  # its first audit row is written

    def add(self, record: EgressRecord) -> None:
        """One more attempt."""
        self.total = merge(self.total, record)
        self.pending = record if self.pending is None else merge(self.pending, record)


class Overflow:
    """Destinations beyond the cap: counted, never kept (a bounded set of hashes)."""

    def __init__(self) -> None:
        self.attempts = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.saturated = False
        self._seen: set[int] = set()

    def add(self, record: EgressRecord) -> None:
        """One attempt at a destination that is not recorded."""
        self.attempts += 1
        self.first_at = self.first_at or record.at
        self.last_at = record.at
        h = hash(record.destination)
        if len(self._seen) < OVERFLOW_MEMORY:
            self._seen.add(h)
        elif h not in self._seen:
            self.saturated = True

    @property
    def destinations(self) -> int:
        """How many distinct destinations were not recorded (at least, when saturated)."""
        return len(self._seen)

    def record(self, cap: int) -> EgressRecord:
        """The stand-in record that says how many more destinations there were."""
        more = f"at least {self.destinations}" if self.saturated else str(self.destinations)
        return EgressRecord(
            host="", port=0, address=None, allowed=False,
            reason=f"{more} more destinations not recorded (egress_max_destinations {cap})",
            audit_only=False, bytes_up=0, bytes_down=0, duration_s=0.0, at=self.first_at,
            attempts=self.attempts, last_at=self.last_at, omitted=self.destinations)


class EgressSession:
    """The proxy of one job and what it decided."""

    def __init__(self, settings: Settings, spec: Job, sandbox: Sandbox, log: JobLog,
                 control: ControlPlane, a: Assignment, *,
                 clean: Callable[[str], str] = lambda text: text) -> None:
        listener = sandbox.egress_listener
        assert listener is not None
        self.control, self.a, self.spec, self.sandbox, self.log = control, a, spec, sandbox, log
        self.clean = clean
        self.cap = max(1, settings.egress_max_destinations)
        self.violated = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tallies: dict[Key, Tally] = {}
        self._destinations: set[str] = set()
        self._dirty: dict[Key, None] = {}
        self._overflow = Overflow()
        self._repeat_budget = self.cap
        self._repeats_at = time.monotonic()
        policy, notes = job_policy(settings, spec, a.trust)
        for note in notes:
            log.note(clean(note))
        raise_open_files()  # each connection the proxy holds is a descriptor of the runner
        limits = Limits(max_connections=settings.egress_max_connections,
                        accept_rate=settings.egress_accept_rate,
                        accept_burst=max(1, int(2 * settings.egress_accept_rate)),
                        header_timeout_s=settings.egress_header_timeout_s,
                        idle_timeout_s=settings.egress_idle_timeout_s)
        self.proxy = JobProxy(policy, resolver_for(settings), listener, self._decided, limits,
                              clean=clean)
        self.proxy.start()
        self._reporter = threading.Thread(target=self._report_loop, daemon=True,
                                          name="egress-audit")
        self._reporter.start()

    def _report_loop(self) -> None:
        """Write decisions to the audit trail as they happen (in batches, off the proxy)."""
        while not self._stop.wait(REPORT_INTERVAL_S):
            self._report(final=False)

    def _report(self, final: bool) -> None:
        with self._lock:
            rows = self._due(final)
            if final and self._overflow.attempts:
                o = self._overflow
                rows.append(("egress.truncated", {
                    "attempt": self.a.attempt, "destinations": o.destinations,
                    "at_least": o.saturated, "attempts": o.attempts, "cap": self.cap,
                    "first_at": o.first_at, "last_at": o.last_at}))
        if rows:
            self.control.report(self.a.job_id, rows)

    def _due(self, final: bool) -> list[tuple[str, dict[str, Any]]]:
        """Audit rows due now: first decisions always, repeats every so often (lock held)."""
        now = time.monotonic()
        repeats = final or (now - self._repeats_at >= REPEAT_INTERVAL_S)
        if repeats:
            self._repeats_at = now
        rows: list[tuple[str, dict[str, Any]]] = []
        kept: dict[Key, None] = {}
        for key in self._dirty:
            tally = self._tallies[key]
            if tally.pending is None:
                continue
            if tally.announced and not final:
                if not repeats or self._repeat_budget <= 0:
                    kept[key] = None
                    continue
                self._repeat_budget -= 1
            rows.append(audit_row(tally.pending, self.a.attempt))
            tally.pending, tally.announced = None, True
        self._dirty = kept
        return rows

    def _decided(self, record: EgressRecord) -> None:
        """Called from the proxy's thread for every connection attempt (``record`` is clean)."""
        key = (record.destination, record.allowed, record.audit_only)
        first = overflowed = False
        with self._lock:
            tally = self._tallies.get(key)
            if tally is not None:
                tally.add(record)
                self._dirty[key] = None
            elif record.destination in self._destinations or len(self._destinations) < self.cap:
                first = True
                self._destinations.add(record.destination)
                self._tallies[key] = Tally(record)
                self._dirty[key] = None
            else:
                overflowed = not self._overflow.attempts
                self._overflow.add(record)
        if overflowed:
            self.log.note(f"egress: more than {self.cap} destinations; further destinations "
                          "are counted, not recorded (egress_max_destinations)")
        self._react(record, first)

    def _react(self, record: EgressRecord, first: bool) -> None:
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
        """Stop the proxy, report what is left; every destination's decisions, added up, in
        the order they first happened (and a stand-in for those beyond the cap)."""
        self.proxy.stop()
        self._stop.set()
        self._reporter.join(timeout=10)
        self._report(final=True)
        with self._lock:
            records = [t.total for t in self._tallies.values()]
            if self._overflow.attempts:
                records.append(self._overflow.record(self.cap))
            return tuple(records)
