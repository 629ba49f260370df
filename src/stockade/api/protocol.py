"""Messages between a runner and the control plane, and the Protocol the control plane offers.

``runner`` and ``control`` never import each other: both import these types only.
"""

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

# How far a job's origin is trusted, lowest first: fork pull requests are "untrusted".
TRUST_LEVELS = ("untrusted", "trusted", "protected")
# A job with isolation: strong carries this claim label, and a runner offers it only when its
# attested sandbox backend is one of STRONG_BACKENDS (a kernel of the job's own between it
# and the host's): the control plane derives it, never from labels a runner was given.
STRONG_ISOLATION_LABEL = "isolation:strong"
STRONG_BACKENDS = ("runsc",)


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DENIED = "denied"
    ERROR = "error"


class FailureReason(StrEnum):
    """Why a job did not succeed (DESIGN.md: every arrow can fail)."""

    SCRIPT_FAILURE = "script_failure"
    TIMEOUT = "timeout"
    OOM = "oom"
    POLICY_DENIED = "policy_denied"
    RUNNER_LOST = "runner_lost"
    EGRESS_VIOLATION = "egress_violation"
    IMAGE_UNVERIFIED = "image_unverified"
    IMAGE_UNAVAILABLE = "image_unavailable"
    IMAGE_VULNERABLE = "image_vulnerable"
    SECRET_UNAVAILABLE = "secret_unavailable"
    SECRET_LEAK = "secret_leak"
    CANCELED = "canceled"
    SYSTEM_ERROR = "system_error"


class LeaseGrant(NamedTuple):
    """A secret issued to an attempt: redeem ``lease_id`` for the value, deliver it so."""

    name: str
    lease_id: str
    delivery: str  # "env" or "file"


class Assignment(NamedTuple):
    """A job handed to a runner: run attempt ``attempt`` of ``spec_json``."""

    job_id: str
    attempt: int
    runner_id: str
    spec_json: str
    lease_expires_at: float
    secrets: tuple[LeaseGrant, ...] = ()
    trust: str = "trusted"
    ref: str = "local"
    workspace_sha256: str | None = None  # the job's uploaded workspace archive, if any


class StepReport(NamedTuple):
    """How one step ended: ``succeeded``, ``failed``, ``timed_out``, ``oom`` or ``canceled``."""

    name: str
    status: str
    exit_code: int | None
    duration_s: float


class ArtifactReport(NamedTuple):
    """An artifact stored under the state directory."""

    path: str
    sha256: str
    size: int


class EgressRecord(NamedTuple):
    """One connection attempt through the egress proxy and what became of it."""

    host: str
    port: int
    address: str | None  # connected to; of a denial: the internal address only an operator opens
    allowed: bool
    reason: str
    audit_only: bool  # allowed only because the mode is audit: block mode would refuse it
    bytes_up: int
    bytes_down: int
    duration_s: float
    at: float  # when it happened (of an aggregate: the first attempt)
    attempts: int = 1  # attempts this record stands for (repeats of one decision, added up)
    last_at: float = 0.0  # of an aggregate: the last attempt (0: the same as ``at``)
    omitted: int = 0  # > 0: no destination, but how many more were not recorded (the cap)

    @property
    def destination(self) -> str:
        """``host:port`` (IPv6 literals bracketed)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def action(self) -> str:
        """The audit action: ``egress.allowed`` or ``egress.denied``."""
        return "egress.allowed" if self.allowed else "egress.denied"

    def audit_detail(self, attempt: int) -> dict[str, Any]:
        """The audit detail of this decision."""
        return {"attempt": attempt, "host": self.host, "port": self.port,
                "address": self.address, "decision": "allowed" if self.allowed else "denied",
                "reason": self.reason, "audit_only": self.audit_only,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "duration_s": round(self.duration_s, 3), "at": self.at}


class Completion(NamedTuple):
    """A runner's report of a finished attempt."""

    job_id: str
    attempt: int
    runner_id: str
    status: JobStatus
    failure_reason: FailureReason | None
    exit_code: int | None
    steps: tuple[StepReport, ...]
    artifacts: tuple[ArtifactReport, ...]
    duration_s: float
    details: Mapping[str, Any] = {}
    egress: tuple[EgressRecord, ...] = ()


class ControlPlane(Protocol):
    """What a runner may ask of the control plane."""

    def claim(self, runner_id: str, labels: tuple[str, ...],
              job_id: str | None = None) -> Assignment | None:
        """Lease the next queued job this runner may take (or exactly ``job_id``)."""
        ...

    def redeem(self, lease_id: str, job_id: str, attempt: int, runner_id: str) -> bytes:
        """The value of a secret lease this attempt holds (PolicyDenied otherwise)."""
        ...

    def mint_id_token(self, job_id: str, attempt: int, runner_id: str) -> str:
        """A fresh OIDC ID token for a running attempt this runner holds."""
        ...

    def report(self, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Record audit events the runner observed (egress decisions, masks, leaks)."""
        ...

    def complete(self, completion: Completion) -> bool:
        """Record a finished attempt; False if the runner no longer holds the job."""
        ...
