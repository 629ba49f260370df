"""The runner protocol on the wire: pydantic models of what runner agents and the server send
each other (the OpenAPI schema comes from them), and conversions to the protocol's types.

(No postponed annotations here: pydantic and FastAPI read the annotations at run time.)
"""

from typing import Any, Literal

from pydantic import BaseModel, Field

from stockade.api.protocol import (
    ArtifactReport,
    Assignment,
    Completion,
    EgressRecord,
    FailureReason,
    JobStatus,
    LeaseGrant,
    StepReport,
)

_ID = r"^[A-Za-z0-9_.-]{1,64}$"
MAX_REPORT_EVENTS = 256
MAX_SECONDS = 10 * 365 * 86400.0  # no duration is longer (finite: no inf, no NaN)
MAX_TIME = 1e11  # a Unix time, long after any clock here
MAX_COUNT = 2**62  # bytes, counts: what a database's BIGINT holds
# the audit actions a runner reports, and nothing else (a runner never speaks for others)
REPORT_ACTIONS = frozenset({"egress.allowed", "egress.denied", "egress.truncated",
                            "secret.leak", "secret.mask_registered", "image.verified",
                            "image.unverified"})
MAX_REPORT_DETAIL = 4096  # bytes of JSON per reported event


class _Strict(BaseModel):
    model_config = {"extra": "forbid"}


class EnrolRequest(_Strict):
    """A runner's first attestation, with the single-use enrolment token."""

    token: str = Field(max_length=200)
    nonce: str = Field(max_length=200)
    public_key: str = Field(max_length=100)
    name: str = Field(max_length=60)
    labels: list[str] = Field(default=[], max_length=32)
    concurrency: int = Field(default=1, ge=1, le=64)
    measurements: dict[str, Any]
    signature: str = Field(max_length=200)


class AttestRequest(_Strict):
    """A runner's fresh attestation, for a new session."""

    runner_id: str = Field(pattern=_ID)
    nonce: str = Field(max_length=200)
    measurements: dict[str, Any]
    signature: str = Field(max_length=200)


class SessionOut(BaseModel):
    """A session: the runner's bearer token until ``expires_at``, and its rhythm."""

    runner_id: str
    token: str
    expires_at: float
    heartbeat_s: float
    lease_s: float


class GrantWire(BaseModel):
    """A secret lease of an assignment."""

    name: str
    lease_id: str
    delivery: str


class AssignmentOut(BaseModel):
    """A claimed job: attempt ``attempt`` of ``spec_json``."""

    # checked on the runner too: it names files after them (a server is trusted to hand out
    # jobs, not to reach the runner's file system)
    job_id: str = Field(pattern=r"^[A-Za-z0-9]{1,64}$")
    attempt: int = Field(ge=1, le=1000)
    runner_id: str = Field(pattern=_ID)
    spec_json: str
    lease_expires_at: float
    secrets: list[GrantWire]
    trust: str
    ref: str
    workspace_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @classmethod
    def of(cls, a: Assignment) -> "AssignmentOut":
        """The wire form of an assignment."""
        return cls(job_id=a.job_id, attempt=a.attempt, runner_id=a.runner_id,
                   spec_json=a.spec_json, lease_expires_at=a.lease_expires_at,
                   secrets=[GrantWire(**g._asdict()) for g in a.secrets], trust=a.trust,
                   ref=a.ref, workspace_sha256=a.workspace_sha256)

    def assignment(self) -> Assignment:
        """Back to the protocol's type."""
        return Assignment(self.job_id, self.attempt, self.runner_id, self.spec_json,
                          self.lease_expires_at,
                          tuple(LeaseGrant(g.name, g.lease_id, g.delivery)
                                for g in self.secrets), self.trust, self.ref,
                          self.workspace_sha256)


class StepWire(_Strict):
    """How a step ended."""

    name: str = Field(max_length=100)
    status: Literal["succeeded", "failed", "timed_out", "oom", "canceled", "error",
                    "skipped"]
    exit_code: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    duration_s: float = Field(ge=0, le=MAX_SECONDS)


class ArtifactWire(_Strict):
    """An uploaded artifact."""

    path: str = Field(max_length=4096)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=MAX_COUNT)


class EgressWire(_Strict):
    """One egress decision (or an aggregate of repeats)."""

    host: str = Field(max_length=300)
    port: int = Field(ge=0, le=65535)
    address: str | None = Field(default=None, max_length=100)
    allowed: bool
    reason: str = Field(max_length=500)
    audit_only: bool = False
    bytes_up: int = Field(default=0, ge=0, le=MAX_COUNT)
    bytes_down: int = Field(default=0, ge=0, le=MAX_COUNT)
    duration_s: float = Field(default=0.0, ge=0, le=MAX_SECONDS)
    at: float = Field(default=0.0, ge=0, le=MAX_TIME)
    attempts: int = Field(default=1, ge=0, le=MAX_COUNT)
    last_at: float = Field(default=0.0, ge=0, le=MAX_TIME)
    omitted: int = Field(default=0, ge=0, le=MAX_COUNT)


class CompletionIn(_Strict):
    """A runner's report of a finished attempt (job, attempt and runner come from the URL and
    the session)."""

    status: Literal["succeeded", "failed", "error"]
    failure_reason: FailureReason | None = None
    exit_code: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    steps: list[StepWire] = Field(default=[], max_length=1000)
    artifacts: list[ArtifactWire] = Field(default=[], max_length=10_000)
    duration_s: float = Field(ge=0, le=MAX_SECONDS)
    details: dict[str, Any] = {}
    egress: list[EgressWire] = Field(default=[], max_length=10_000)

    @classmethod
    def of(cls, c: Completion) -> "CompletionIn":
        """The wire form of a completion."""
        return cls(status=c.status.value,  # type: ignore[arg-type]
                   failure_reason=c.failure_reason,
                   exit_code=c.exit_code, steps=[StepWire(**s._asdict()) for s in c.steps],
                   artifacts=[ArtifactWire(**a._asdict()) for a in c.artifacts],
                   duration_s=c.duration_s, details=dict(c.details),
                   egress=[EgressWire(**e._asdict()) for e in c.egress])

    def completion(self, job_id: str, attempt: int, runner_id: str) -> Completion:
        """Back to the protocol's type."""
        return Completion(
            job_id, attempt, runner_id, JobStatus(self.status), self.failure_reason,
            self.exit_code, tuple(StepReport(**s.model_dump()) for s in self.steps),
            tuple(ArtifactReport(**a.model_dump()) for a in self.artifacts),
            self.duration_s, self.details,
            tuple(EgressRecord(**e.model_dump()) for e in self.egress))


class CompletedOut(BaseModel):
    """A completion recorded, and the runner's next job if it asked for one (``?next=true``)
    and one was queued for it."""

    recorded: bool
    next: AssignmentOut | None = None


class HeartbeatOut(BaseModel):
    """Whether the attempt still holds the job, and whether it is to stop."""

    held: bool
    cancel: bool


class RedeemIn(_Strict):
    """A secret lease to redeem."""

    lease_id: str = Field(pattern=_ID)


class ReportIn(_Strict):
    """Audit events a runner observed (egress decisions, masks registered, leaks)."""

    events: list[tuple[str, dict[str, Any]]] = Field(max_length=MAX_REPORT_EVENTS)
