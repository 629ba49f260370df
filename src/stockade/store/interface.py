"""The store seam: row types and the Protocol every backend implements."""

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from stockade.audit import AuditEvent, AuditSnapshot


class JobRow(NamedTuple):
    """A job as stored."""

    id: str
    name: str
    spec_json: str
    labels_json: str
    status: str
    failure_reason: str | None
    exit_code: int | None
    attempt: int
    runner_id: str | None
    lease_expires_at: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    result_json: str | None
    trust: str = "trusted"
    ref: str = "local"
    max_attempts: int = 1  # runner agents: a lost attempt is requeued until this many ran
    cancel_requested_at: float | None = None
    workspace_sha256: str | None = None  # an uploaded workspace archive (a blob)


class StepRow(NamedTuple):
    """A finished step of a job."""

    idx: int
    name: str
    status: str
    exit_code: int | None
    duration_s: float


class ArtifactRow(NamedTuple):
    """A collected artifact of a job."""

    path: str
    sha256: str
    size: int


class SecretRow(NamedTuple):
    """A stored secret: its scope and its sealed value (never plaintext)."""

    name: str
    version: int
    scope_jobs: str
    scope_labels: str
    scope_trust: str
    scope_refs: str  # a glob over the job's ref (chosen by the submitter, never by the spec)
    key_id: str
    nonce: bytes
    ciphertext: bytes
    created_at: float
    updated_at: float


class LeaseRow(NamedTuple):
    """A secret issued to one attempt of one job."""

    id: str
    job_id: str
    attempt: int
    runner_id: str
    secret_name: str
    secret_version: int
    delivery: str
    issued_at: float
    expires_at: float
    revoked_at: float | None


class Revocation(NamedTuple):
    """An attempt's secret leases revoked as it ends: when, and each one's audit event."""

    at: float
    event_for: Callable[[LeaseRow], AuditEvent]


class ClaimRequest(NamedTuple):
    """A claim of the oldest eligible queued job for ``runner_id`` (see
    ``Store.claim_attempt``, whose arguments these are)."""

    runner_id: str
    lease_until: Callable[[JobRow], float]
    event_for: Callable[[JobRow], AuditEvent]
    eligible: Callable[[JobRow], bool]
    agent: bool = False
    after: tuple[str, int] | None = None


class FinishRequest(NamedTuple):
    """The end of an attempt (see ``Store.finish_attempt``, whose arguments these are)."""

    job_id: str
    attempt: int
    runner_id: str
    changes: dict[str, Any]
    steps: list[StepRow]
    artifacts: list[ArtifactRow]
    events: list[AuditEvent]
    revoke: Revocation | None = None


class TokenRow(NamedTuple):
    """An API token of ``stockade server``: only the sha256 of its secret part is kept."""

    id: str
    name: str
    role: str  # viewer, submitter or admin
    max_trust: str  # the highest trust a job submitted with it gets
    secret_sha256: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    refs: str = "*"  # a glob over the refs of the jobs it may submit


class EnrolTokenRow(NamedTuple):
    """A single-use token a runner agent enrols with (only the hash of its secret is kept)."""

    id: str
    pool: str
    secret_sha256: str
    created_at: float
    expires_at: float
    used_at: float | None
    runner_id: str | None
    labels_json: str = "[]"  # the labels its runner may offer (it gets them all by default)
    max_trust: str = "trusted"  # the highest trust of the jobs its runner may take


class RunnerRow(NamedTuple):
    """An enrolled runner agent: its public key, labels and standing."""

    id: str
    name: str
    pool: str
    labels_json: str
    concurrency: int
    public_key: str  # Ed25519, base64
    status: str  # active, draining, quarantined or unattested
    measurements_json: str  # what its last attestation reported
    attested_at: float | None
    created_at: float
    last_seen_at: float | None
    max_trust: str = "trusted"  # from its enrolment token


class SessionRow(NamedTuple):
    """A runner's short-lived bearer token (hash only), issued for a fresh attestation."""

    id: str
    runner_id: str
    secret_sha256: str
    created_at: float
    expires_at: float


class AttemptRow(NamedTuple):
    """One attempt of a job: who ran it, when, and how it ended (``lost``: its runner did
    not finish it)."""

    job_id: str
    attempt: int
    runner_id: str
    started_at: float
    ended_at: float | None
    outcome: str
    log_bytes: int


class Store(Protocol):
    """Transactions the control plane needs; each call is one transaction with its audit event."""

    def batched(self, calls: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        """Run ``calls`` (store calls) in one transaction: ``(True, result)`` or
        ``(False, exception)`` each (see ``SqlStore.batched``)."""
        ...

    def insert_job(self, job: JobRow, event: AuditEvent) -> None:
        """Add a new job."""
        ...

    def claim_attempt(self, runner_id: str, lease_until: Callable[[JobRow], float],
                      event_for: Callable[[JobRow], AuditEvent],
                      eligible: Callable[[JobRow], bool], agent: bool = False,
                      after: tuple[str, int] | None = None) -> JobRow | None:
        """Atomically move the oldest eligible queued job to ``running`` for ``runner_id`` as
        its next attempt (for a runner ``agent``: only while it is active)."""
        ...

    def finish_attempt(self, job_id: str, attempt: int, runner_id: str,
                       changes: dict[str, Any], steps: list[StepRow],
                       artifacts: list[ArtifactRow], events: list[AuditEvent],
                       revoke: Revocation | None = None) -> bool:
        """Record an attempt's outcome, steps, artifacts and audit events, if that attempt of
        ``runner_id`` still holds the job (fencing); with ``revoke``, its live secret leases
        are revoked in the same transaction (an event each)."""
        ...

    def claim_attempts(self, requests: list[ClaimRequest]) -> list[JobRow | None]:
        """Several claims in one go, in order (the earlier ones take the older jobs)."""
        ...

    def finish_attempts(self, requests: list[FinishRequest]) -> list[bool]:
        """Several attempts' ends in one go: whether each was recorded."""
        ...

    def finish_and_claim(self, finishes: list[FinishRequest], claims: list[ClaimRequest],
                         after: list[int | None]) -> tuple[list[bool], list[JobRow | None]]:
        """``finish_attempts(finishes)``, then ``claim_attempts(claims)`` for the claims
        whose ``after`` (an index into ``finishes``) is None or was recorded: the others take
        nothing (a completion that asks for the next job, refused by fencing)."""
        ...

    def extend_lease(self, job_id: str, attempt: int, runner_id: str,
                     until: float) -> tuple[bool, bool]:
        """A heartbeat: ``(held, cancel_requested)``."""
        ...

    def holds(self, job_id: str, attempt: int, runner_id: str) -> bool:
        """Whether this attempt of ``runner_id`` is the job's current, running one."""
        ...

    def expire_leases(self, now: float, event_for: Callable[[JobRow, bool], AuditEvent]
                      ) -> list[tuple[JobRow, bool]]:
        """Requeue (True) or fail the jobs of runner agents whose lease ran out."""
        ...

    def attempts(self, job_id: str) -> list[AttemptRow]:
        """The attempts of a job, in order."""
        ...

    def count_jobs_by_status(self) -> list[tuple[str, int]]:
        """How many jobs there are of each status."""
        ...

    def schema_revision(self) -> str | None:
        """The database's schema revision."""
        ...

    def request_cancel(self, job_id: str, now: float, event: AuditEvent) -> str | None:
        """Cancel a queued job (``canceled``) or ask a running one to stop (``requested``)."""
        ...

    def insert_enrol_token(self, row: EnrolTokenRow, event: AuditEvent) -> None:
        """Add an enrolment token."""
        ...

    def enrol(self, token_id: str, check: Callable[[EnrolTokenRow | None], str | None],
              runner: RunnerRow, session: SessionRow, events: list[AuditEvent]) -> str | None:
        """Spend an enrolment token and add the runner (or say why not)."""
        ...

    def get_runner(self, runner_id: str) -> RunnerRow | None:
        """A runner by id."""
        ...

    def runners(self) -> list[RunnerRow]:
        """Every runner, newest first."""
        ...

    def session(self, session_id: str) -> tuple[SessionRow, RunnerRow] | None:
        """A runner session and its runner."""
        ...

    def sessions(self, session_ids: list[str]) -> dict[str, tuple[SessionRow, RunnerRow]]:
        """The sessions of these ids that exist, each with its runner, in one read."""
        ...

    def attest(self, runner_id: str, status: str, measurements_json: str, now: float,
               session: SessionRow | None, event: AuditEvent) -> bool:
        """Record a runner's attestation (and its new session if it passed)."""
        ...

    def set_runner_status(self, runner_id: str, status: str, allowed_from: tuple[str, ...],
                          event: AuditEvent) -> bool:
        """Drain, resume or quarantine a runner."""
        ...

    def fail_runner_jobs(self, runner_id: str, now: float,
                         event_for: Callable[[JobRow], AuditEvent]) -> list[JobRow]:
        """Fail every job running on a runner (runner_lost)."""
        ...

    def spend_nonce(self, nonce: str, expires_at: float, now: float) -> bool:
        """Mark an attestation nonce used; False if it was."""
        ...

    def server_secret(self, name: str, make: Callable[[], bytes]) -> bytes:
        """A secret shared by the replicas."""
        ...

    def put_log_chunk(self, job_id: str, attempt: int, runner_id: str, seq: int, data: bytes,
                      cap: int) -> str:
        """Store a log chunk idempotently (stored, duplicate, conflict, fenced or full)."""
        ...

    def log_chunks(self, job_id: str, after: tuple[int, int] = (0, -1),
                   limit: int = 256) -> list[tuple[int, int, bytes]]:
        """A job's log chunks after a position."""
        ...

    def put_blob(self, sha256: str, data: bytes, now: float) -> None:
        """Keep content under its sha256."""
        ...

    def get_blob(self, sha256: str) -> bytes | None:
        """A blob's bytes."""
        ...

    def has_blob(self, sha256: str) -> int | None:
        """A blob's size, if there is one."""
        ...

    def read_blob(self, sha256: str, offset: int, size: int) -> bytes | None:
        """Up to ``size`` bytes of a blob from ``offset`` (a download, a slice at a time);
        None if there is no such blob."""
        ...

    def put_upload(self, job_id: str, attempt: int, runner_id: str, sha256: str,
                   data: bytes, now: float) -> bool:
        """Keep an attempt's upload (False if the attempt no longer holds the job)."""
        ...

    def uploaded(self, job_id: str, attempt: int) -> dict[str, int]:
        """sha256 → size of what this attempt uploaded."""
        ...

    def prune_blobs(self, before: float) -> int:
        """Remove unreferenced old blobs."""
        ...

    def fail_lost(self, now: float, lost_ids: list[str],
                  runner_gone: Callable[[str], bool | None],
                  event_for: Callable[[JobRow], AuditEvent]) -> list[str]:
        """Fail jobs no runner will finish: in ``lost_ids``, queued or running for a runner
        that is gone (``runner_gone`` True), or running past their lease for a runner whose
        liveness is unknown (None)."""
        ...

    def get_job(self, id_or_prefix: str) -> JobRow | None:
        """A job by id or unique id prefix."""
        ...

    def job_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` job ids starting with ``prefix``, newest first."""
        ...

    def insert_token(self, token: TokenRow, event: AuditEvent) -> None:
        """Add an API token and its audit event."""
        ...

    def get_tokens(self, token_ids: list[str]) -> dict[str, TokenRow]:
        """API tokens by id (those that exist), in one read."""
        ...

    def tokens(self) -> list[TokenRow]:
        """Every API token, newest first."""
        ...

    def revoke_token(self, token_id: str, now: float, event: AuditEvent) -> bool:
        """Revoke a token not revoked yet (False if there is none)."""
        ...

    def list_jobs(self, limit: int) -> list[JobRow]:
        """The newest jobs first."""
        ...

    def job_steps(self, job_id: str) -> list[StepRow]:
        """The steps of a job, in order."""
        ...

    def job_artifacts(self, job_id: str) -> list[ArtifactRow]:
        """The artifacts of a job."""
        ...

    def audit_records(self, job_id: str | None = None) -> list[tuple[AuditEvent, str, str]]:
        """``(event, prev_hash, hash)`` in order, optionally only those of one job."""
        ...

    def audit_snapshot(self) -> AuditSnapshot:
        """The whole trail and its head(s), read so that they agree unless someone tampered."""
        ...

    def record(self, events: list[AuditEvent]) -> None:
        """Append audit events that go with no other change."""
        ...

    def put_secret(self, row: SecretRow, event: AuditEvent) -> None:
        """Create or replace a secret."""
        ...

    def get_secret(self, name: str) -> SecretRow | None:
        """A secret by name."""
        ...

    def list_secrets(self) -> list[SecretRow]:
        """All secrets by name."""
        ...

    def delete_secret(self, name: str, event: AuditEvent) -> bool:
        """Remove a secret; False if there was none."""
        ...

    def insert_leases(self, leases: list[LeaseRow], events: list[AuditEvent]) -> None:
        """Record issued leases."""
        ...

    def get_lease(self, lease_id: str) -> LeaseRow | None:
        """A lease by id."""
        ...

    def live_leases(self, job_id: str, attempt: int) -> list[LeaseRow]:
        """The secret leases an attempt holds and that were not revoked."""
        ...

    def ended_attempt(self, job_id: str, attempt: int, runner_id: str
                      ) -> tuple[str, str | None, int | None] | None:
        """``(outcome, next job, its attempt)`` of an ended attempt of ``runner_id``."""
        ...

    def revoke_leases(self, job_id: str, attempt: int, now: float,
                      event_for: Callable[[LeaseRow], AuditEvent]) -> list[LeaseRow]:
        """Revoke the attempt's live leases; return them."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...
