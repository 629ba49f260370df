"""The control plane's side of runner agents: enrolment with attestation, sessions, claims with
short leases kept alive by heartbeats, fenced writes, lost attempts, cancel, drain, quarantine.

Everything lives in the store, so any number of server replicas on one database can serve any
runner; nothing here keeps state between requests.
"""

import base64
import functools
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from stockade.api import auth
from stockade.api.attestation import (
    MAX_MEASUREMENTS_BYTES,
    AttestationPolicy,
    make_nonce,
    nonce_expiry,
    nonce_refusal,
    signed_bytes,
    verify_signature,
)
from stockade.api.protocol import (
    STRONG_BACKENDS,
    STRONG_ISOLATION_LABEL,
    TRUST_LEVELS,
    Assignment,
    Completion,
    LeaseGrant,
)
from stockade.audit import AuditEvent
from stockade.control.service import ControlService
from stockade.errors import PolicyDenied, UsageError
from stockade.ids import new_runner_id
from stockade.store.interface import (
    ClaimRequest,
    EnrolTokenRow,
    JobRow,
    RunnerRow,
    SessionRow,
)

ENROL_PREFIX = "stke_"
SESSION_PREFIX = "stks_"
MAX_ENROL_TTL_S = 7 * 86400.0
MAX_LABELS = 32
PRUNE_EVERY_S = 600.0
BLOB_GRACE_S = 3600.0  # an upload no job refers to is kept this long (it may be about to)


class FleetPolicy(NamedTuple):
    """The operator's fleet settings."""

    attestation: AttestationPolicy = AttestationPolicy()
    session_ttl_s: float = 600.0  # a runner attests again before its session ends
    lease_s: float = 30.0  # a running attempt is lost this long after its last heartbeat
    heartbeat_s: float = 2.0  # how often runners heartbeat (and so how soon a cancel lands)
    max_attempts: int = 2
    log_cap_bytes: int = 65 * 1024 * 1024
    artifact_max_total_bytes: int = 1024 * 1024 * 1024


class Session(NamedTuple):
    """A runner's bearer token (shown to it once) and what it should know."""

    runner_id: str
    token: str
    expires_at: float
    heartbeat_s: float
    lease_s: float


class Caller(NamedTuple):
    """An authenticated runner request."""

    runner: RunnerRow
    session: SessionRow


class ClaimWork(NamedTuple):
    """A runner's claim: its next job or None (see :meth:`FleetService.serve`)."""

    caller: Caller


class CompleteWork(NamedTuple):
    """A runner's completion of an attempt and, with ``take_next`` (unless the client is
    ``gone`` by then), the claim of its next job: a :class:`Completed`."""

    caller: Caller
    completion: Completion
    take_next: bool
    gone: Callable[[], bool]


class Completed(NamedTuple):
    """What became of a completion: refused (why), recorded (``held``), or not recorded
    because it is this attempt's recorded completion sent again (``replayed``: its answer
    was lost) or because the attempt no longer holds the job (neither); ``next``: the job it
    claimed, or (replayed) the one its first sending claimed, if the runner still holds it."""

    refusal: str | None = None
    held: bool = False
    replayed: bool = False
    next: Assignment | None = None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _b32(n: int) -> str:
    return base64.b32encode(os.urandom(n)).decode().rstrip("=").lower()


class FleetService:
    """Runner agents over a :class:`ControlService` (and its store)."""

    def __init__(self, control: ControlService, policy: FleetPolicy, own_digest: str) -> None:
        self.control = control
        self.store = control.store
        self.policy = policy
        self.own_digest = own_digest
        self._budget = AuditBudget("runner.refused_more")
        self._pruned = 0.0

    def _event(self, actor: str, action: str, job_id: str | None = None,
               **detail: Any) -> AuditEvent:
        return AuditEvent(actor, action, self.control.clock(), job_id, detail)

    # -- enrolment and attestation --------------------------------------------------------

    def create_enrol_token(self, pool: str, ttl_s: float, actor: str,
                           labels: tuple[str, ...] = (), max_trust: str = "trusted"
                           ) -> tuple[EnrolTokenRow, str]:
        """A single-use enrolment token for ``pool`` (the token is shown once): its runner
        may offer ``labels`` (all of them unless it asks for fewer) and take jobs of trust up
        to ``max_trust``."""
        if not pool or len(pool) > 100 or not all(c.isalnum() or c in "-_." for c in pool) \
                or not pool.isascii():
            raise UsageError("a pool name is 1 to 100 letters, digits, '-', '_' or '.'")
        if not 0 < ttl_s <= MAX_ENROL_TTL_S:
            raise UsageError("an enrolment token lives more than 0 s and at most 7 days",
                             hint="e.g. --ttl 10m")
        if max_trust not in TRUST_LEVELS:
            raise UsageError(f"{max_trust[:20]!r} is not a trust level",
                             hint=f"use one of {', '.join(TRUST_LEVELS)}")
        try:
            _check_runner_fields("x", list(labels), 1)
        except PolicyDenied as e:
            raise UsageError(e.message) from e
        now = self.control.clock()
        token_id, secret = "e" + _b32(5), _b32(32)
        row = EnrolTokenRow(token_id, pool, _digest(secret), now, now + ttl_s, None, None,
                            json.dumps(sorted(set(labels))), max_trust)
        self.store.insert_enrol_token(row, self._event(
            actor, "runner.enrol_token_created", token=token_id, pool=pool,
            labels=sorted(set(labels)), max_trust=max_trust, expires_at=row.expires_at))
        return row, f"{ENROL_PREFIX}{token_id}_{secret}"

    def nonce(self) -> str:
        """A fresh attestation nonce."""
        return make_nonce(self._nonce_key())

    def _nonce_key(self) -> bytes:
        return self.store.server_secret("nonce", lambda: os.urandom(32))

    def _verified(self, nonce: str, subject: str, public_key: str,
                  measurements: dict[str, Any], signature: str) -> str | None:
        """Why this attestation's signature or nonce is not good (None if it is)."""
        now = self.control.clock()
        if len(json.dumps(measurements)) > MAX_MEASUREMENTS_BYTES:
            return "the measurements are too large"
        why = nonce_refusal(self._nonce_key(), nonce, now)
        if why:
            return why
        if not verify_signature(public_key, signed_bytes(nonce, subject, public_key,
                                                         measurements), signature):
            return "the attestation signature does not verify with the runner's key"
        if not self.store.spend_nonce(nonce, nonce_expiry(nonce), now):
            return "the nonce was used already"
        return None

    def _new_session(self, runner_id: str) -> tuple[SessionRow, str]:
        now = self.control.clock()
        session_id, secret = "s" + _b32(8), _b32(32)
        row = SessionRow(session_id, runner_id, _digest(secret), now,
                         now + self.policy.session_ttl_s)
        return row, f"{SESSION_PREFIX}{session_id}_{secret}"

    def _refuse(self, action: str, subject: str, why: str, **detail: Any) -> PolicyDenied:
        """Audit a refused enrolment or attestation (within the budget) and return the error."""
        events = self._budget.admit(self._event("api", action, None, subject=subject[:64],
                                                reason=why, **detail))
        if events:
            self.store.record(events)
        return PolicyDenied(why)

    def enrol(self, token: str, nonce: str, public_key: str, name: str, labels: list[str],
              concurrency: int, measurements: dict[str, Any], signature: str) -> Session:
        """Enrol a runner agent: a good single-use token, a signature by the key it enrols
        over our nonce, and measurements the policy accepts (PolicyDenied otherwise, audited)."""
        parts = auth.split(token, ENROL_PREFIX)
        if parts is None:
            raise self._refuse("runner.enrol_refused", "?", "not an enrolment token")
        token_id, secret = parts
        _check_runner_fields(name, labels, concurrency)
        why = self._verified(nonce, token_id, public_key, measurements, signature)
        if why:
            raise self._refuse("runner.enrol_refused", token_id, why)
        failures = self.policy.attestation.failures(measurements, self.own_digest)
        if failures:
            raise self._refuse("runner.attestation_failed", token_id, "; ".join(failures),
                               stage="enrol")
        now = self.control.clock()

        def check(row: EnrolTokenRow | None) -> str | None:
            if row is None or not hmac.compare_digest(row.secret_sha256, _digest(secret)):
                return "unknown enrolment token"
            if row.used_at is not None:
                return "this enrolment token was used already"
            if row.expires_at <= now:
                return "this enrolment token expired"
            allowed = set(json.loads(row.labels_json))
            if not set(labels) <= allowed:
                return (f"this enrolment token allows the labels {sorted(allowed)} only (an "
                        "admin chooses them: stockade runner enrol-token --labels)")
            return None

        runner_id = new_runner_id(f"r-{name[:40]}")
        # the pool is the token's: the store sets it
        runner = RunnerRow(runner_id, name, "", json.dumps(sorted(set(labels))), concurrency,
                           public_key, "active", json.dumps(measurements, sort_keys=True), now,
                           now, now)
        session, bearer = self._new_session(runner_id)
        events = [self._event(f"runner:{runner_id}", "runner.enrolled", token=token_id,
                              name=name, labels=sorted(set(labels)),
                              stockade_sha256=measurements.get("stockade_sha256")),
                  self._event(f"runner:{runner_id}", "runner.attested", stage="enrol")]
        why = self.store.enrol(token_id, check, runner, session, events)
        if why:
            raise self._refuse("runner.enrol_refused", token_id, why)
        return Session(runner_id, bearer, session.expires_at, self.policy.heartbeat_s,
                       self.policy.lease_s)

    def reattest(self, runner_id: str, nonce: str, measurements: dict[str, Any],
                 signature: str) -> Session:
        """A new session for a runner whose fresh attestation passes; a failing one leaves it
        ``unattested`` (no claims, no secrets) until it passes again."""
        runner = self.store.get_runner(runner_id)
        if runner is None or runner.status == "quarantined":
            raise self._refuse("runner.attestation_failed", runner_id,
                               "unknown or quarantined runner")
        why = self._verified(nonce, runner_id, runner.public_key, measurements, signature)
        if why:
            raise self._refuse("runner.attestation_failed", runner_id, why)
        failures = self.policy.attestation.failures(measurements, self.own_digest)
        now, blob = self.control.clock(), json.dumps(measurements, sort_keys=True)
        actor = f"runner:{runner_id}"
        if failures:
            self.store.attest(runner_id, "unattested", blob, now, None, self._event(
                actor, "runner.attestation_failed", reason="; ".join(failures)))
            raise PolicyDenied("; ".join(failures))
        session, bearer = self._new_session(runner_id)
        if not self.store.attest(runner_id, "active", blob, now, session,
                                 self._event(actor, "runner.attested", stage="session")):
            raise PolicyDenied("unknown or quarantined runner")
        return Session(runner_id, bearer, session.expires_at, self.policy.heartbeat_s,
                       self.policy.lease_s)

    def authenticate(self, bearer: str) -> Caller | str:
        """The runner behind a session token, or why there is none."""
        return self.authenticate_all([bearer])[0]

    def authenticate_all(self, bearers: list[str]) -> list[Caller | str]:
        """:meth:`authenticate` for each of ``bearers``, with one read of their sessions."""
        parts = [auth.split(bearer, SESSION_PREFIX) for bearer in bearers]
        found = self.store.sessions(sorted({p[0] for p in parts if p is not None}))
        now = self.control.clock()
        return [self._authenticated(p, found.get(p[0]) if p else None, now) for p in parts]

    @staticmethod
    def _authenticated(parts: tuple[str, str] | None,
                       found: tuple[SessionRow, RunnerRow] | None, now: float) -> Caller | str:
        if parts is None:
            return "no valid runner session token"
        if found is None or not hmac.compare_digest(found[0].secret_sha256,
                                                    _digest(parts[1])):
            return "unknown runner session"
        session, runner = found
        if session.expires_at <= now:
            return "the runner session expired: attest again"
        if runner.status == "quarantined":
            return "this runner is quarantined"
        return Caller(runner, session)

    # -- work -----------------------------------------------------------------------------

    def _claim_request(self, caller: Caller, after: tuple[str, int] | None) -> ClaimRequest:
        """The claim of this runner's next job (none if it may not take work now); ``after``:
        the attempt whose completion asks for it (which remembers it)."""
        runner = caller.runner  # its status is read again in the claim's transaction
        return self.control.claim_request(runner.id, runner_labels(runner),
                                          lease_s=self.policy.lease_s,
                                          max_trust=runner.max_trust, after=after)

    def serve(self, works: list[ClaimWork | CompleteWork]) -> list[Any]:
        """Serve runners' claims and completions together, in one transaction when the
        caller runs a batch: every completion, then every claim (the completions' next jobs
        first), in one ``finish_and_claim``. Each work's result in
        order: an :class:`~stockade.api.protocol.Assignment` or None for a
        :class:`ClaimWork`, a :class:`Completed` for a :class:`CompleteWork`."""
        out: list[Any] = [None] * len(works)
        finishing: list[tuple[int, CompleteWork]] = []
        for i, work in enumerate(works):
            if isinstance(work, CompleteWork):
                why = self._refusal(work.caller, work.completion)
                if why is not None:
                    out[i] = Completed(refusal=why)
                else:
                    finishing.append((i, work))
        claims: list[tuple[int, ClaimRequest]] = []
        after: list[int | None] = []  # the completion a claim comes with
        for k, (i, work) in enumerate(finishing):
            if work.take_next and not work.gone():
                c = work.completion
                claims.append((i, self._claim_request(work.caller, (c.job_id, c.attempt))))
                after.append(k)
        for i, w in enumerate(works):
            if isinstance(w, ClaimWork):
                claims.append((i, self._claim_request(w.caller, None)))
                after.append(None)
        held, jobs = self.store.finish_and_claim(
            [self.control.finish_request(w.completion) for _, w in finishing],
            [request for _, request in claims], after)
        for (i, _), ok in zip(finishing, held, strict=True):
            if ok:
                out[i] = Completed(held=True)
        for (i, _), job in zip(claims, jobs, strict=True):
            a = None if job is None else self.control.assignment(job)
            if isinstance(works[i], ClaimWork):
                out[i] = a
            elif a is not None:
                out[i] = Completed(held=True, next=a)
        # fenced, unless it is a completion recorded before, sent again (its answer was lost):
        # looked at after the claims, so that a copy sent again while the first was in this
        # very batch gets the job the first claimed
        for (i, work), ok in zip(finishing, held, strict=True):
            if ok:
                continue
            c = work.completion
            replayed, a = self.replayed(work.caller, c.job_id, c.attempt, c.status.value)
            out[i] = Completed(replayed=replayed, next=a)
        return out

    def replayed(self, caller: Caller, job_id: str, attempt: int, status: str
                 ) -> tuple[bool, Assignment | None]:
        """Whether a refused completion is this runner's own, sent again (its answer was
        lost): the attempt ended with this outcome. Then also the job that completion claimed,
        if the runner still holds it, as it was handed out (nobody else can have it)."""
        ended = self.store.ended_attempt(job_id, attempt, caller.runner.id)
        if ended is None or ended[0] != status:
            return False, None
        _, next_id, next_attempt = ended
        job = self.store.get_job(next_id) if next_id else None
        if job is None or (job.id, job.status, job.attempt, job.runner_id) != (
                next_id, "running", next_attempt, caller.runner.id):
            return True, None
        grants = tuple(LeaseGrant(lease.secret_name, lease.id, lease.delivery)
                       for lease in self.store.live_leases(job.id, job.attempt))
        return True, Assignment(job.id, job.attempt, caller.runner.id, job.spec_json,
                                job.lease_expires_at or 0.0, grants, job.trust, job.ref,
                                job.workspace_sha256)

    def heartbeat(self, caller: Caller, job_id: str, attempt: int) -> tuple[bool, bool]:
        """Extend the attempt's lease: ``(held, cancel)``."""
        return self.store.extend_lease(job_id, attempt, caller.runner.id,
                                       self.control.clock() + self.policy.lease_s)

    def may_use_secrets(self, caller: Caller) -> bool:
        """Only an attested runner (active or draining) redeems secrets and ID tokens."""
        return caller.runner.status in ("active", "draining")

    def put_log(self, caller: Caller, job_id: str, attempt: int, seq: int, data: bytes) -> str:
        """Store one log chunk (see ``Store.put_log_chunk``)."""
        return self.store.put_log_chunk(job_id, attempt, caller.runner.id, seq, data,
                                        self.policy.log_cap_bytes)

    def put_artifact(self, caller: Caller, job_id: str, attempt: int, sha256: str,
                     data: bytes) -> str | None:
        """Keep an uploaded artifact's bytes if they match ``sha256`` (why not, otherwise)."""
        if hashlib.sha256(data).hexdigest() != sha256:
            return "the artifact's bytes do not match its sha256"
        if not self.store.put_upload(job_id, attempt, caller.runner.id, sha256, data,
                                     self.control.clock()):
            return "fenced"
        return None

    def _refusal(self, caller: Caller, completion: Completion) -> str | None:
        """Why this completion is refused: another runner's attempt, artifacts this attempt
        did not upload, or over the server's limits (None: it may be recorded)."""
        if completion.runner_id != caller.runner.id:
            return "a runner completes only its own attempts"
        paths = [a.path for a in completion.artifacts]
        if len(set(paths)) != len(paths):
            return "two artifacts have the same path"
        if any("\x00" in text for text in (*paths, *(s.name for s in completion.steps))):
            return "a step name or an artifact path holds a NUL character"
        uploaded = self.store.uploaded(completion.job_id, completion.attempt) \
            if completion.artifacts else {}
        total = 0
        for n, a in enumerate(completion.artifacts):
            if uploaded.get(a.sha256) != a.size:
                return f"artifact number {n + 1} was not uploaded by this attempt"
            total += a.size
        if total > self.policy.artifact_max_total_bytes:
            return "the artifacts are larger than the server accepts"
        return None

    def sweep(self) -> list[tuple[JobRow, bool]]:
        """Expired leases: their attempts are lost; jobs requeued or failed runner_lost; the
        lost attempts' secret leases revoked. Every ten minutes also the uploads (workspace
        archives, artifacts) that no job refers to any more, after an hour's grace."""

        def event(job: JobRow, again: bool) -> AuditEvent:
            return self._event("control", "job.attempt_lost", job.id, attempt=job.attempt,
                               runner_id=job.runner_id, requeued=again)

        now = self.control.clock()
        lost = self.store.expire_leases(now, event)
        if self.control.broker is not None:
            for job, _ in lost:
                self.control.broker.revoke(job.id, job.attempt)
        if now - self._pruned > PRUNE_EVERY_S:  # uploads no job refers to any more
            self._pruned = now
            self.store.prune_blobs(now - BLOB_GRACE_S)
        return lost

    # -- operators ------------------------------------------------------------------------

    def cancel(self, job_id: str, actor: str) -> str | None:
        """Cancel a job (see ``Store.request_cancel``)."""
        return self.store.request_cancel(job_id, self.control.clock(),
                                         self._event(actor, "job.cancel", job_id))

    def drain(self, runner_id: str, actor: str) -> bool:
        """Stop a runner taking new jobs; it finishes those it runs."""
        return self.store.set_runner_status(runner_id, "draining", ("active", "unattested"),
                                            self._event(actor, "runner.drained", runner=runner_id))

    def resume(self, runner_id: str, actor: str) -> bool:
        """Let a drained runner take jobs again."""
        return self.store.set_runner_status(runner_id, "active", ("draining",),
                                            self._event(actor, "runner.resumed",
                                                        runner=runner_id))

    def quarantine(self, runner_id: str, actor: str) -> list[str] | None:
        """Stop a runner for good: no claims, its sessions gone, its jobs failed
        (runner_lost) and their secret leases revoked; readmitted only by enrolling anew
        (with a token from an admin). None if the runner is unknown."""
        if not self.store.set_runner_status(
                runner_id, "quarantined", ("active", "draining", "unattested"),
                self._event(actor, "runner.quarantined", runner=runner_id)):
            return None

        def event(job: JobRow) -> AuditEvent:
            return self._event(actor, "job.runner_lost", job.id, attempt=job.attempt,
                               runner_id=runner_id, quarantined=True)

        jobs = self.store.fail_runner_jobs(runner_id, self.control.clock(), event)
        if self.control.broker is not None:
            for job in jobs:
                self.control.broker.revoke(job.id, job.attempt)
        return [job.id for job in jobs]


class AuditBudget:
    """At most ``per_minute`` audit events a minute for what anyone on the network can cause
    (refused enrolments and attestations); the rest of a minute is counted into one event."""

    def __init__(self, more_action: str, per_minute: int = 60) -> None:
        self.more_action, self.per_minute = more_action, per_minute
        self._lock = threading.Lock()
        self._minute, self._recorded, self._more = 0, 0, 0

    def admit(self, event: AuditEvent) -> list[AuditEvent]:
        """The events to record now: ``event`` within the budget, and the count of the
        previous minute's excess once a new minute starts."""
        out = []
        minute = int(event.at // 60)
        with self._lock:
            if minute != self._minute:
                if self._more:
                    out.append(event._replace(action=self.more_action, job_id=None,
                                              detail={"count": self._more}))
                self._minute, self._recorded, self._more = minute, 0, 0
            if self._recorded < self.per_minute:
                self._recorded += 1
                out.append(event)
            else:
                self._more += 1
        return out


def runner_labels(runner: RunnerRow) -> tuple[str, ...]:
    """What a runner offers at a claim: its labels, and the strong-isolation label when its
    last attested measurements say its sandbox backend gives a kernel of the job's own."""
    if len(runner.measurements_json) > REMEMBERED_MEASUREMENTS:
        return _offered.__wrapped__(runner.labels_json, runner.measurements_json)
    return _offered(runner.labels_json, runner.measurements_json)


REMEMBERED_MEASUREMENTS = 16 * 1024  # bytes of a runner's measurements remembered at most


@functools.lru_cache(maxsize=256)
def _offered(labels_json: str, measurements_json: str) -> tuple[str, ...]:
    """:func:`runner_labels` of these columns (remembered: each claim read the whole
    measurements' JSON again, 2% of a server's CPU at a fleet's rate of claims)."""
    labels = [x for x in json.loads(labels_json) if x != STRONG_ISOLATION_LABEL]
    try:
        backend = json.loads(measurements_json).get("sandbox_backend")
    except (ValueError, AttributeError):
        backend = None
    if backend in STRONG_BACKENDS:
        labels.append(STRONG_ISOLATION_LABEL)
    return tuple(labels)


def _check_runner_fields(name: str, labels: list[str], concurrency: int) -> None:
    if not name or len(name) > 60 or not all(c.isalnum() or c in "-_." for c in name) \
            or not name.isascii():
        raise PolicyDenied("a runner name is 1 to 60 letters, digits, '-', '_' or '.'")
    if len(labels) > MAX_LABELS or any(not (0 < len(x) <= 64) or not x.isascii()
                                       or not x.isprintable() or " " in x for x in labels):
        raise PolicyDenied(f"at most {MAX_LABELS} labels of 1 to 64 printable characters")
    if STRONG_ISOLATION_LABEL in labels:
        raise PolicyDenied(f"{STRONG_ISOLATION_LABEL} is not a label to give: runners offer it "
                           f"when their sandbox backend is {' or '.join(STRONG_BACKENDS)}")
    if not 1 <= concurrency <= 64:
        raise PolicyDenied("a runner's concurrency is 1 to 64")
