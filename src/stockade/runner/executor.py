"""Running one claimed job: prepare, steps, artifacts, teardown, report."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from stockade.api.protocol import (
    Assignment,
    Completion,
    ControlPlane,
    EgressRecord,
    FailureReason,
    JobStatus,
    StepReport,
)
from stockade.config import Settings
from stockade.errors import PolicyDenied, StockadeError
from stockade.runner.artifacts import collect
from stockade.runner.identity import TokenRefresher
from stockade.runner.logs import JobLog
from stockade.runner.secrets import JobSecrets
from stockade.sandbox.interface import Backend, Sandbox, SandboxRequest, StepExit, StepRun
from stockade.spec import Job
from stockade.spec.units import format_size

if TYPE_CHECKING:
    from stockade.runner.egress import EgressSession

BASE_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


def proxy_env(url: str | None) -> dict[str, str]:
    """Proxy variables for the steps (both spellings tools look for); none without egress."""
    if url is None:
        return {}
    no_proxy = "localhost,127.0.0.1,::1"
    return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
            "NO_PROXY": no_proxy, "no_proxy": no_proxy}


def step_env(spec: Job, job_id: str, attempt: int, step: str) -> dict[str, str]:
    """The whole environment of a step: documented CI/STOCKADE_* variables and the spec's env."""
    return {
        **spec.env,
        "CI": "true",
        "STOCKADE": "true",
        "STOCKADE_JOB_ID": job_id,
        "STOCKADE_JOB_NAME": spec.name,
        "STOCKADE_ATTEMPT": str(attempt),
        "STOCKADE_STEP": step,
        "STOCKADE_WORKSPACE": "/workspace",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "USER": "ci",
        "LOGNAME": "ci",
        "LANG": "C.UTF-8",
        "PATH": BASE_PATH,
    }


class Runner:
    """An in-process runner that executes jobs it claims from a control plane."""

    def __init__(self, settings: Settings, backend: Backend, control: ControlPlane,
                 runner_id: str, labels: tuple[str, ...] = (),
                 live: BinaryIO | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self.control = control
        self.runner_id = runner_id
        self.labels = labels
        self.live = live

    def run_one(self, workspace: Path | None, job_id: str | None = None) -> Completion | None:
        """Claim one job (``job_id`` if given), execute it, report it; None if none was queued."""
        assignment = self.control.claim(self.runner_id, self.labels, job_id)
        if assignment is None:
            return None
        completion = self.execute(assignment, workspace)
        if not self.control.complete(completion):
            raise StockadeError(f"job {assignment.job_id} is no longer leased to this runner")
        return completion

    def execute(self, a: Assignment, workspace: Path | None) -> Completion:
        """Run the assignment end to end; every failure becomes a reason, never an exception."""
        spec = Job.from_json(a.spec_json)
        started = time.monotonic()
        secrets: JobSecrets | None = None
        log = JobLog(self.settings.logs_dir / f"{a.job_id}.log", self.settings.log_cap_bytes,
                     self.live)
        details: dict[str, Any] = {"runner_id": self.runner_id, "sandbox": self.backend.name}
        steps: list[StepReport] = []
        artifacts = []
        status: JobStatus = JobStatus.SUCCEEDED
        reason: FailureReason | None = None
        exit_code: int | None = 0
        sandbox: Sandbox | None = None
        egress: EgressSession | None = None
        identity: TokenRefresher | None = None
        records: tuple[EgressRecord, ...] = ()
        try:
            log.note(f"job {spec.name} ({a.job_id}) attempt {a.attempt} on {self.runner_id}")
            secrets = JobSecrets(self.control, a, self.runner_id)
            log.use_masker(secrets.masker, secrets.mask_registered)
            sandbox = self.backend.prepare(self._request(spec, a, workspace))
            if sandbox.egress_listener is not None:
                from stockade.runner.egress import EgressSession  # asyncio: only when needed

                egress = EgressSession(self.settings, spec, sandbox, log)
            if sandbox.identity_token_path is not None:
                identity = TokenRefresher(self.control, a, self.runner_id, sandbox,
                                          secrets.masker, self.settings.oidc_refresh_s)
            status, reason, exit_code = self._run_steps(spec, a, sandbox, log, steps, started,
                                                        egress, secrets)
            collected = collect(sandbox.workspace, spec.artifacts,
                                self.settings.artifacts_dir / a.job_id,
                                self.settings.artifact_max_file_bytes,
                                self.settings.artifact_max_total_bytes, secrets.scan)
            for path, names in collected.leaks:
                secrets.leaked(f"artifact {path}", names)
            if collected.leaks:
                status, reason = JobStatus.FAILED, FailureReason.SECRET_LEAK
            artifacts = collected.stored
            for problem in collected.refused:
                log.note(f"artifact refused: {problem}")
            if collected.refused:
                details["artifacts_refused"] = collected.refused
            details["memory_peak_bytes"] = sandbox.memory_peak()
        except KeyboardInterrupt:
            status, reason, exit_code = JobStatus.FAILED, FailureReason.CANCELED, None
            log.note("canceled by the user")
        except PolicyDenied as e:
            status, reason, exit_code = JobStatus.FAILED, FailureReason.SECRET_UNAVAILABLE, None
            details["error"] = e.diagnostics()
            log.note(f"secret unavailable: {e.diagnostics()}")
        except StockadeError as e:
            status, reason, exit_code = JobStatus.ERROR, FailureReason.SYSTEM_ERROR, None
            details["error"] = e.diagnostics()
            log.note(f"error: {e.diagnostics()}")
        except Exception as e:  # the job boundary: record it, never lose the job
            status, reason, exit_code = JobStatus.ERROR, FailureReason.SYSTEM_ERROR, None
            details["error"] = f"internal error: {type(e).__name__}: {e}"
            log.note(f"internal error: {type(e).__name__}: {e}")
        finally:
            if identity is not None:
                identity.close()
                for problem in identity.errors:
                    log.note(f"id token refresh failed: {problem}")
            if egress is not None:
                records = egress.close()
            if sandbox is not None:
                leftovers = sandbox.teardown()
                if leftovers:
                    details["leftovers"] = leftovers
                    for item in leftovers:
                        log.note(f"TEARDOWN FAILED: {item}")
                    status, reason = JobStatus.ERROR, FailureReason.SYSTEM_ERROR
        duration = time.monotonic() - started
        self._summary(log, spec, a.job_id, status, reason, steps, artifacts, duration)
        details["log_truncated"] = log.dropped > 0
        log.close()
        if secrets is not None:
            if in_log := secrets.scan(log.path):
                secrets.leaked("the stored log", sorted(in_log))
            if secrets.leaks:
                status, reason = JobStatus.FAILED, FailureReason.SECRET_LEAK
                details["secret_leaks"] = [{"where": w, "secrets": n} for w, n in secrets.leaks]
            if secrets.reports:
                self.control.report(a.job_id, secrets.reports)
        return Completion(a.job_id, a.attempt, self.runner_id, status, reason, exit_code,
                          tuple(steps), tuple(artifacts), duration, details, records)

    def _request(self, spec: Job, a: Assignment, workspace: Path | None) -> SandboxRequest:
        r = spec.resources
        return SandboxRequest(job_id=a.job_id, cpus=r.cpus, memory_bytes=r.memory, pids=r.pids,
                              tmp_bytes=r.tmp, workspace_bytes=r.workspace,
                              workspace_src=workspace, egress=spec.egress.mode != "none",
                              identity=spec.id_token is not None)

    def _run_steps(self, spec: Job, a: Assignment, sandbox: Sandbox, log: JobLog,
                   steps: list[StepReport], started: float, egress: EgressSession | None,
                   secrets: JobSecrets) -> tuple[JobStatus, FailureReason | None, int | None]:
        deadline = started + spec.timeout
        extra_env = {**secrets.env, **proxy_env(sandbox.proxy_url)}
        if sandbox.identity_token_path:
            extra_env["STOCKADE_ID_TOKEN_FILE"] = sandbox.identity_token_path
        for step in spec.steps:
            if egress is not None and egress.violated:
                return JobStatus.FAILED, FailureReason.EGRESS_VIOLATION, None
            remaining = deadline - time.monotonic()
            timeout = min(step.timeout or math.inf, remaining)
            log.note(f"step {step.name}")
            env = {**step_env(spec, a.job_id, a.attempt, step.name), **extra_env}
            exit = sandbox.run(StepRun(step.name, step.run, env, max(timeout, 0.0),
                                       secrets.files), log.output)
            log.flush_partial()
            step_status, reason = _classify(exit, egress is not None and egress.violated)
            steps.append(StepReport(step.name, step_status, exit.exit_code, exit.duration_s))
            if reason is not None:
                log.note(_explain(step.name, exit, reason, timeout, spec))
                return JobStatus.FAILED, reason, exit.exit_code
            log.note(f"step {step.name} succeeded in {exit.duration_s:.2f}s")
        return JobStatus.SUCCEEDED, None, 0

    def _summary(self, log: JobLog, spec: Job, job_id: str, status: JobStatus,
                 reason: FailureReason | None, steps: list[StepReport],
                 artifacts: list[Any], duration: float) -> None:
        outcome = status.value + (f" ({reason.value})" if reason else "")
        log.note(f"job {spec.name}: {outcome} in {duration:.2f}s, "
                 f"{len(steps)}/{len(spec.steps)} steps run, {len(artifacts)} artifacts")
        for art in artifacts:
            log.note(f"artifact {art.path} {format_size(art.size)} sha256:{art.sha256[:16]}…")
        if artifacts:
            log.note(f"artifacts stored in {self.settings.artifacts_dir / job_id}")


def _classify(exit: StepExit, violated: bool) -> tuple[str, FailureReason | None]:
    if violated:
        return "killed", FailureReason.EGRESS_VIOLATION
    if exit.oom_killed and exit.exit_code != 0:
        return "oom", FailureReason.OOM
    if exit.timed_out:
        return "timed_out", FailureReason.TIMEOUT
    if exit.exit_code != 0:
        return "failed", FailureReason.SCRIPT_FAILURE
    return "succeeded", None


def _explain(name: str, exit: StepExit, reason: FailureReason, timeout: float,
             spec: Job) -> str:
    if reason is FailureReason.OOM:
        return (f"step {name} was killed: out of memory (limit "
                f"{format_size(spec.resources.memory)}, /tmp and /workspace count against it)")
    if reason is FailureReason.EGRESS_VIOLATION:
        return f"step {name} was killed: it tried to reach a destination the policy denies"
    if reason is FailureReason.TIMEOUT:
        return f"step {name} timed out after {timeout:.0f}s; all its processes were killed"
    return f"step {name} failed with exit code {exit.exit_code}"
