"""Admission, claiming and completion of jobs, each one transaction with its audit event.

Admission applies the operator's :class:`AdmissionPolicy` to what the spec asks for, per the
job's trust level (decided by the submitter, never by the spec): which ID-token audiences it
may get, which secrets (the broker's scopes) and, for untrusted jobs, how much egress.
"""

import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from stockade.api.protocol import (
    STRONG_BACKENDS,
    STRONG_ISOLATION_LABEL,
    TRUST_LEVELS,
    Assignment,
    Completion,
    FailureReason,
    JobStatus,
    LeaseGrant,
)
from stockade.audit import AuditEvent
from stockade.control.egress import egress_summary
from stockade.errors import PolicyDenied, StockadeError, UsageError
from stockade.ids import new_job_id
from stockade.spec import Job
from stockade.store.interface import (
    ArtifactRow,
    ClaimRequest,
    FinishRequest,
    JobRow,
    StepRow,
    Store,
)

if TYPE_CHECKING:
    from stockade.secrets.broker import Broker
    from stockade.secrets.oidc import KeyRing

LEASE_GRACE_S = 300.0
MAX_REF_LENGTH = 200


def _unknown(runner_id: str) -> bool | None:
    return None


class AdmissionPolicy(NamedTuple):
    """The operator's admission settings (the CLI builds them from
    :class:`~stockade.config.Settings`; the defaults are the settings' defaults).

    ``oidc_audiences_<trust>``: the ID-token audiences a job of that trust may ask for
    (``"*"``: any; exact strings otherwise). ``egress_untrusted_allow``: the most an untrusted
    job's ``egress.allow`` may ask for."""

    oidc_audiences_untrusted: tuple[str, ...] = ()
    oidc_audiences_trusted: tuple[str, ...] = ("*",)
    oidc_audiences_protected: tuple[str, ...] = ("*",)
    egress_untrusted_allow: tuple[str, ...] = ()
    image_registries: tuple[str, ...] = ()
    # the sandbox backend of the one runner that takes every job (stockade run's own);
    # empty for a fleet, where a job waits for a runner that can take it
    runner_backend: str = ""

    def isolation_refusal(self, isolation: str) -> str | None:
        """Why no runner here can take a job asking for ``isolation`` (None if one can)."""
        if isolation != "strong" or not self.runner_backend \
                or self.runner_backend in STRONG_BACKENDS:
            return None
        return (f"the job asks for isolation: strong, which only a runner whose sandbox backend "
                f"is {' or '.join(STRONG_BACKENDS)} (gVisor) takes; this runner's is "
                f"{self.runner_backend!r}: set sandbox_backend = \"runsc\" "
                "(STOCKADE_SANDBOX_BACKEND=runsc) where stockade doctor reports the runsc "
                "backend usable, or ask for isolation: standard")

    def image_refusal(self, image: str) -> str | None:
        """Why a job may not run on ``image`` (None if it may): only ``host`` and images from
        the registries the operator lists (the runner pulls them, outside any sandbox: a job
        must not make it talk to any host it likes)."""
        if image == "host":
            return None
        registry = image.split("/", 1)[0]
        if registry in self.image_registries:
            return None
        allowed = (f"jobs may use images from {', '.join(map(repr, self.image_registries))} "
                   "only" if self.image_registries else "no registry is allowed (only image: host)")
        return (f"image {image[:200]!r}: {allowed}; the operator can allow {registry[:100]!r} "
                "with the setting image_registries (STOCKADE_IMAGE_REGISTRIES)")

    def audiences(self, trust: str) -> tuple[str, ...]:
        """The audiences a job of ``trust`` may ask for."""
        return {"untrusted": self.oidc_audiences_untrusted,
                "trusted": self.oidc_audiences_trusted,
                "protected": self.oidc_audiences_protected}.get(trust, ())

    def audience_refusal(self, trust: str, aud: str) -> str | None:
        """Why a job of ``trust`` may not get an ID token for ``aud`` (None if it may)."""
        allowed = self.audiences(trust)
        if "*" in allowed or aud in allowed:
            return None
        setting = f"oidc_audiences_{trust}"
        return (f"jobs of trust {trust!r} may not get an ID token for audience {aud!r} "
                f"(allowed: {', '.join(map(repr, allowed)) or 'none'}); the operator can allow "
                f"it with the setting {setting} (STOCKADE_{setting.upper()})")


_RESULT_KEYS = frozenset({"job_id", "name", "status", "failure_reason", "exit_code", "attempt",
                          "runner_id", "steps", "artifacts", "egress", "duration_s",
                          "created_at"})


class JobView(NamedTuple):
    """A job with its steps and artifacts, as ``show`` and ``--json`` present it."""

    job: JobRow
    steps: list[StepRow]
    artifacts: list[ArtifactRow]

    def result(self) -> dict[str, Any]:
        """The result object of the CLI contract."""
        extra = json.loads(self.job.result_json) if self.job.result_json else {}
        return {
            "job_id": self.job.id,
            "name": self.job.name,
            "status": self.job.status,
            "failure_reason": self.job.failure_reason,
            "exit_code": self.job.exit_code,
            "attempt": self.job.attempt,
            "runner_id": self.job.runner_id,
            "steps": [{"name": s.name, "status": s.status, "exit_code": s.exit_code,
                       "duration_s": round(s.duration_s, 3)} for s in self.steps],
            "artifacts": [{"path": a.path, "sha256": a.sha256, "size": a.size}
                          for a in self.artifacts],
            "egress": extra.get("egress", egress_summary(())),
            "duration_s": extra.get("duration_s"),
            "created_at": self.job.created_at,
        } | {k: v for k, v in extra.items() if k not in _RESULT_KEYS}  # never overriding


class Admitted(NamedTuple):
    """A submitted job before it is stored (:meth:`ControlService.admit`)."""

    job: JobRow
    event: AuditEvent  # job.admitted or job.denied
    refusals: tuple[tuple[str, str], ...]  # (secret, why) refused at admission


class ControlService:
    """The control plane over a :class:`~stockade.store.interface.Store`."""

    def __init__(self, store: Store, actor: str, clock: Callable[[], float] = time.time,
                 broker: "Broker | None" = None,
                 identity: "Callable[[], KeyRing] | None" = None,
                 policy: AdmissionPolicy | None = None,
                 resolve_image: Callable[[str], str] | None = None) -> None:
        self.store = store
        self._resolve_image = resolve_image  # a tag to the digest it names now
        self.policy = policy or AdmissionPolicy()
        self.actor = actor
        self.clock = clock
        self.broker = broker
        self._identity = identity
        self._keyring: KeyRing | None = None

    @property
    def keyring(self) -> "KeyRing":
        """The OIDC signing keys (loaded on first use)."""
        if self._keyring is None:
            if self._identity is None:
                raise PolicyDenied("no OIDC issuer is configured")
            self._keyring = self._identity()
        return self._keyring

    def mint_id_token(self, job_id: str, attempt: int, runner_id: str) -> str:
        """A fresh ID token for a running attempt held by ``runner_id`` (audited).

        The audience is checked against the policy again (admission did it first), so a token
        is never signed for an audience the job's trust may not have."""
        from stockade.secrets.oidc import job_claims

        job = self.store.get_job(job_id)
        if job is None or (job.status, job.attempt, job.runner_id) != ("running", attempt,
                                                                        runner_id):
            raise PolicyDenied(f"job {job_id} attempt {attempt} is not running on {runner_id}")
        spec = Job.from_json(job.spec_json)
        if spec.id_token is None:
            raise PolicyDenied(f"job {job_id} did not ask for an id_token")
        refused = self.policy.audience_refusal(job.trust, spec.id_token.aud)
        if refused:
            self.store.record([self._event("oidc.token_refused", job_id, attempt=attempt,
                                           runner_id=runner_id, reason=refused)])
            raise PolicyDenied(refused)
        token, claims = self.keyring.mint(job_claims(
            aud=spec.id_token.aud, job_id=job_id, job_name=spec.name, ref=job.ref,
            attempt=attempt, runner_id=runner_id, trust=job.trust, image_digest=spec.image))
        self.store.record([self._event("oidc.token_issued", job_id, jti=claims["jti"],
                                       aud=claims["aud"], exp=claims["exp"],
                                       kid=self.keyring.active_kid)])
        return token

    def audit_event(self, action: str, job_id: str | None, **detail: Any) -> AuditEvent:
        """An audit event by this control plane's actor."""
        return AuditEvent(self.actor, action, self.clock(), job_id, detail)

    def _event(self, action: str, job_id: str, actor: str | None = None,
               **detail: Any) -> AuditEvent:
        return AuditEvent(actor or self.actor, action, self.clock(), job_id, detail)

    def submit(self, spec: Job, trust: str = "trusted", ref: str = "local",
               runner_id: str | None = None, actor: str | None = None,
               max_attempts: int = 1, workspace_sha256: str | None = None) -> JobRow:
        """Admit ``spec`` (queued) or deny it (denied, with the reason), store it; return the
        job (:meth:`admit`, then :meth:`store_admitted`)."""
        admitted = self.admit(spec, trust, ref, runner_id, actor, max_attempts,
                              workspace_sha256)
        self.store_admitted(admitted)
        return admitted.job

    def admit(self, spec: Job, trust: str = "trusted", ref: str = "local",
              runner_id: str | None = None, actor: str | None = None,
              max_attempts: int = 1, workspace_sha256: str | None = None) -> Admitted:
        """The job ``spec`` makes, admitted (queued) or denied (with the reason), and its
        audit event, to store; the secrets it was refused, to audit once it is stored.

        ``trust`` says how far the job's origin is trusted (``untrusted`` for fork pull
        requests, ``trusted``, ``protected``); ``ref`` is the source reference it runs;
        ``runner_id`` reserves the job for that runner (``stockade run``'s own): only it may
        claim the job, and if it dies before, the job is lost at once instead of queued.
        A job whose attempt is lost (its runner agent stopped heartbeating) is queued again
        until ``max_attempts`` ran; ``workspace_sha256`` names its uploaded workspace.
        Reads the store (secrets) and a registry (an image's tag) unless
        :meth:`admits_offline` says the spec needs neither; :meth:`store_admitted` stores
        the outcome."""
        check_submission(trust, ref)
        now = self.clock()
        job_id = new_job_id()
        refusals = self._secret_refusals(spec, trust, ref)
        reason, message = self._admission(spec, trust, refusals)
        if reason is None:
            spec, reason, message = self._pin_image(spec)
        status = JobStatus.DENIED if reason else JobStatus.QUEUED
        extra = json.dumps({"message": message}) if message else None
        job = JobRow(
            id=job_id, name=spec.name, spec_json=spec.to_json(),
            labels_json=json.dumps(claim_labels(spec)), status=status.value,
            failure_reason=reason.value if reason else None, exit_code=None, attempt=0,
            runner_id=runner_id, lease_expires_at=None, created_at=now, started_at=None,
            finished_at=now if reason else None, result_json=extra, trust=trust, ref=ref,
            max_attempts=max_attempts, workspace_sha256=workspace_sha256,
        )
        action = "job.denied" if reason else "job.admitted"
        detail = {"name": spec.name, **({"reason": reason.value, "message": message}
                                        if reason else {})}
        return Admitted(job, self._event(action, job_id, actor=actor, **detail),
                        tuple(refusals))

    @staticmethod
    def admits_offline(spec: Job) -> bool:
        """Whether :meth:`admit` needs neither the store nor a registry for ``spec``: it asks
        for no secret and names no image by tag."""
        return not spec.secrets and (spec.image == "host" or "@sha256:" in spec.image)

    def store_admitted(self, admitted: Admitted) -> None:
        """Store the job :meth:`admit` made, and audit the secrets it was refused (in one
        transaction when the caller runs this in a store batch, as a server does)."""
        self.store.insert_job(admitted.job, admitted.event)
        if self.broker is not None:
            for name, why in admitted.refusals:
                self.broker.refuse(admitted.job.id, name, why)

    def _pin_image(self, spec: Job) -> tuple[Job, FailureReason | None, str]:
        """``spec`` with its image's tag resolved to the digest it names now (recorded: every
        attempt runs that digest), or why it cannot be (image_unavailable/_unverified)."""
        if spec.image == "host" or "@sha256:" in spec.image:
            return spec, None, ""
        from stockade.image.errors import ImageRefused

        if self._resolve_image is None:
            return spec, FailureReason.IMAGE_UNAVAILABLE, "no registry is reachable from here"
        try:
            return spec._replace(image=self._resolve_image(spec.image)), None, ""
        except ImageRefused as e:
            return spec, FailureReason.IMAGE_UNVERIFIED, e.message
        except StockadeError as e:
            return spec, FailureReason.IMAGE_UNAVAILABLE, e.message

    def _secret_refusals(self, spec: Job, trust: str, ref: str) -> list[tuple[str, str]]:
        if not spec.secrets:
            return []
        if self.broker is None:
            return [(s.name, "no secret broker is configured") for s in spec.secrets]
        refusals = []
        for s in spec.secrets:
            why = self.broker.refusal(s.name, spec.name, spec.labels, trust, ref)
            if why:
                refusals.append((s.name, why))
        return refusals

    def _admission(self, spec: Job, trust: str, refusals: list[tuple[str, str]]
                   ) -> tuple[FailureReason | None, str]:
        denials = self._policy_denials(spec, trust)
        if denials:
            return FailureReason.POLICY_DENIED, "; ".join(denials)
        if refusals:
            return FailureReason.SECRET_UNAVAILABLE, "; ".join(why for _, why in refusals)
        return None, ""

    def _policy_denials(self, spec: Job, trust: str) -> list[str]:
        """What the spec asks for beyond what the operator allows a job of ``trust``."""
        denials = []
        why = self.policy.image_refusal(spec.image)
        if why:
            denials.append(why)
        why = self.policy.isolation_refusal(spec.isolation)
        if why:
            denials.append(why)
        if spec.id_token is not None:
            why = self.policy.audience_refusal(trust, spec.id_token.aud)
            if why:
                denials.append(why)
        if trust == "untrusted":
            from stockade.egress.admission import untrusted_refusal  # only untrusted jobs

            why = untrusted_refusal(spec.egress.mode, spec.egress.allow,
                                    self.policy.egress_untrusted_allow)
            if why:
                denials.append(why)
        return denials

    def claim(self, runner_id: str, labels: tuple[str, ...],
              job_id: str | None = None, lease_s: float | None = None,
              max_trust: str = "protected",
              after: tuple[str, int] | None = None) -> Assignment | None:
        """Lease the oldest queued job whose labels this runner has (or exactly ``job_id``),
        until its timeout and a grace period, or for ``lease_s`` (a runner agent's lease,
        extended by its heartbeats). A runner takes jobs of trust up to ``max_trust`` only."""
        request = self.claim_request(runner_id, labels, job_id, lease_s, max_trust, after)
        job = self.store.claim_attempt(*request)
        return None if job is None else self.assignment(job)

    def claim_request(self, runner_id: str, labels: tuple[str, ...],
                      job_id: str | None = None, lease_s: float | None = None,
                      max_trust: str = "protected",
                      after: tuple[str, int] | None = None) -> ClaimRequest:
        """What :meth:`claim` asks of the store (several go in one ``claim_attempts``)."""
        ceiling = TRUST_LEVELS.index(max_trust)
        offered = set(labels)

        def eligible(job: JobRow) -> bool:
            if job.runner_id not in (None, runner_id):  # reserved for another runner
                return False
            if TRUST_LEVELS.index(job.trust) > ceiling:
                return False
            if job_id is not None:
                return job.id == job_id
            return set(json.loads(job.labels_json)) <= offered

        def event(job: JobRow) -> AuditEvent:
            return self._event("job.claimed", job.id, actor=f"runner:{runner_id}",
                               attempt=job.attempt)

        def lease_until(job: JobRow) -> float:
            if lease_s is not None:
                return self.clock() + lease_s
            return self.clock() + Job.from_json(job.spec_json).timeout + LEASE_GRACE_S

        return ClaimRequest(runner_id, lease_until, event, eligible, lease_s is not None, after)

    def assignment(self, job: JobRow) -> Assignment:
        """A claimed job as its runner gets it, with the leases of the secrets it asks for
        issued (in the claim's transaction when it runs in a batch)."""
        assert job.runner_id is not None
        spec = Job.from_json(job.spec_json)
        grants: tuple[LeaseGrant, ...] = ()
        if spec.secrets and self.broker is not None:
            grants = self.broker.issue(job.id, job.attempt, job.runner_id,
                                       [(s.name, s.delivery) for s in spec.secrets],
                                       ttl=spec.timeout)
        return Assignment(job.id, job.attempt, job.runner_id, job.spec_json,
                          job.lease_expires_at or 0.0, grants, job.trust, job.ref,
                          job.workspace_sha256)

    def redeem(self, lease_id: str, job_id: str, attempt: int, runner_id: str) -> bytes:
        """The value of a secret lease held by this attempt (refused and audited otherwise)."""
        if self.broker is None:
            raise PolicyDenied("no secret broker is configured")
        return self.broker.redeem(lease_id, job_id, attempt, runner_id)

    def report(self, job_id: str, events: list[tuple[str, dict[str, Any]]],
               actor: str | None = None) -> None:
        """Audit events observed by a runner (egress decisions, masks registered, leaks), in
        its name (``actor``; the in-process runner's are this control plane's)."""
        self.store.record([AuditEvent(actor or self.actor, action, self.clock(), job_id,
                                      detail) for action, detail in events])

    def fail_lost(self, orphaned: Sequence[str] = (),
                  runner_gone: Callable[[str], bool | None] = _unknown) -> list[str]:
        """Fail jobs whose runner died: its sandbox was found orphaned, its lease expired, or
        ``runner_gone`` says it is dead (queued jobs reserved for it too); their secret leases
        are revoked at once."""

        def event(job: JobRow) -> AuditEvent:
            return self._event("job.runner_lost", job.id, attempt=job.attempt,
                               runner_id=job.runner_id)

        lost = self.store.fail_lost(self.clock(), list(orphaned), runner_gone, event)
        if self.broker is not None:
            for job_id in lost:
                job = self.store.get_job(job_id)
                if job is not None:
                    self.broker.revoke(job_id, job.attempt)
        return lost

    def complete(self, c: Completion) -> bool:
        """Record a runner's outcome of an attempt it still holds, with its egress decisions."""
        return self.store.finish_attempt(*self.finish_request(c))

    def finish_request(self, c: Completion) -> FinishRequest:
        """What :meth:`complete` asks of the store (several go in one ``finish_attempts``)."""
        details = {"duration_s": round(c.duration_s, 3), **c.details,
                   "egress": egress_summary(c.egress)}
        changes = {
            "status": c.status.value,
            "failure_reason": c.failure_reason.value if c.failure_reason else None,
            "exit_code": c.exit_code, "finished_at": self.clock(), "lease_expires_at": None,
            "result_json": json.dumps(details),
        }
        steps = [StepRow(i, s.name, s.status, s.exit_code, s.duration_s)
                 for i, s in enumerate(c.steps)]
        artifacts = [ArtifactRow(a.path, a.sha256, a.size) for a in c.artifacts]
        events = [self._event(f"job.{c.status.value}", c.job_id, actor=f"runner:{c.runner_id}",
                              attempt=c.attempt, failure_reason=changes["failure_reason"],
                              exit_code=c.exit_code)]
        # its secret leases revoked with it (a refused one revokes nobody's)
        revoke = None if self.broker is None else self.broker.revocation(c.job_id, c.attempt)
        return FinishRequest(c.job_id, c.attempt, c.runner_id, changes, steps, artifacts,
                             events, revoke)

    def job(self, job_id: str) -> JobRow | None:
        """A job by its exact id (None if unknown)."""
        job = self.store.get_job(job_id)
        return job if job is not None and job.id == job_id else None

    def view(self, id_or_prefix: str) -> JobView | None:
        """A job by id or unique prefix, with steps and artifacts."""
        job = self.store.get_job(id_or_prefix)
        if job is None:
            return None
        return JobView(job, self.store.job_steps(job.id), self.store.job_artifacts(job.id))

    def audit_trail(self, job_id: str) -> list[AuditEvent]:
        """The audit events of one job, oldest first."""
        return [event for event, _, _ in self.store.audit_records(job_id)]

    def jobs(self, limit: int = 20) -> list[JobRow]:
        """The newest jobs."""
        return self.store.list_jobs(limit)


def check_submission(trust: str, ref: str) -> None:
    """Refuse a trust level or ref that is not one (UsageError, exit 2).

    The ref ends the ID token's ``sub`` and is matched by secret scopes and tokens' ref
    globs, so it must be plain text: printable, no spaces, at most 200 characters, and a name
    git would take (``git check-ref-format``: no ``..``, ``//``, ``@{``, glob or special
    characters, no part starting with a dot or ending in ``.lock``): a token for
    ``refs/heads/*`` submitted ``refs/heads/../../refs/tags/v1``, which a relying party that
    tidies paths reads as a tag."""
    if trust not in TRUST_LEVELS:
        raise UsageError(f"{trust!r} is not a trust level",
                         hint=f"use one of {', '.join(TRUST_LEVELS)}")
    parts = ref.split("/")
    if not ref or len(ref) > MAX_REF_LENGTH or not ref.isprintable() \
            or any(c.isspace() or c in _NOT_IN_REFS for c in ref) or ".." in ref \
            or "@{" in ref or ref.endswith(".") \
            or any(not p or p.startswith(".") or p.endswith(".lock") for p in parts):
        raise UsageError("the ref is not one: a ref is printable text without spaces, at "
                         f"most {MAX_REF_LENGTH} characters, that git would take as a ref "
                         "name",  # (not repeated: a request's)
                         hint="pass e.g. --ref refs/heads/main")


_NOT_IN_REFS = frozenset("~^:?*[\\")  # (git check-ref-format)


def claim_labels(spec: Job) -> list[str]:
    """The labels a runner must offer to take the job: the spec's, and the strong-isolation
    label for ``isolation: strong``."""
    labels = list(spec.labels)
    if spec.isolation == "strong" and STRONG_ISOLATION_LABEL not in labels:
        labels.append(STRONG_ISOLATION_LABEL)
    return labels
