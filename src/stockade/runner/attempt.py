"""One attempt of one job on this runner: prepare, steps, artifacts, teardown, report.

Every failure becomes a status and a reason on the :class:`Completion`, never an exception:
the job is always accounted for.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from stockade.errors import InfrastructureError, PolicyDenied, StockadeError
from stockade.runner.environment import proxy_env, step_env
from stockade.runner.logs import JobLog
from stockade.runner.secrets import JobSecrets
from stockade.sandbox.interface import (
    Backend,
    Sandbox,
    SandboxRequest,
    StepExit,
    StepRun,
    WorkspaceCopy,
    WorkspaceSource,
)
from stockade.spec import Job
from stockade.spec.units import format_size

if TYPE_CHECKING:
    from stockade.image.cache import CachedImage, ImageCache
    from stockade.image.reference import ImageRef
    from stockade.image.trust import Verdict
    from stockade.runner.egress import EgressSession
    from stockade.runner.identity import TokenRefresher


COLLECT_FLOOR_S = 30.0
COLLECT_MAX_S = 120.0


class Canceled(Exception):
    """The attempt was stopped from outside (:meth:`Attempt.cancel`)."""


class ImageProblem(Exception):
    """The job's image could not be had or was refused (``reason``: image_unavailable,
    _unverified or _vulnerable)."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


class Attempt:
    """The state of one attempt while it runs."""

    def __init__(self, settings: Settings, backend: Backend, control: ControlPlane,
                 runner_id: str, a: Assignment, log: JobLog) -> None:
        self.settings, self.backend, self.control = settings, backend, control
        self.runner_id, self.a, self.log = runner_id, a, log
        self.spec = Job.from_json(a.spec_json)
        self.started = time.monotonic()
        self.status: JobStatus = JobStatus.SUCCEEDED
        self.reason: FailureReason | None = None
        self.exit_code: int | None = 0
        self.details: dict[str, Any] = {"runner_id": runner_id, "sandbox": backend.name}
        self.steps: list[StepReport] = []
        self.artifacts: list[Any] = []
        self.secrets: JobSecrets | None = None
        self.sandbox: Sandbox | None = None
        self.egress: EgressSession | None = None
        self.identity: TokenRefresher | None = None
        self.records: tuple[EgressRecord, ...] = ()
        self._running: tuple[str, float] | None = None  # the step running, since when
        self._canceled: str | None = None  # why the attempt was canceled from outside
        self._image_use: int | None = None  # the image cache's in-use lock of the job's image

    def cancel(self, why: str) -> None:
        """Stop the attempt from another thread (a runner agent's heartbeat): the job's
        processes are killed and it ends ``failed`` (``canceled``), saying ``why``."""
        if self._canceled is None:
            self._canceled = why
        sandbox = self.sandbox
        if sandbox is not None:
            sandbox.kill()

    def _check_canceled(self) -> None:
        if self._canceled is not None:
            raise Canceled(self._canceled)

    def run(self, workspace: WorkspaceSource | None) -> Completion:
        """Everything, in order; the completion to report."""
        try:
            self._prepare(workspace)
            assert self.sandbox is not None and self.secrets is not None
            self._run_steps(self.sandbox, self.secrets)
            self._check_canceled()
            self._collect(self.sandbox, self.secrets)
        except (KeyboardInterrupt, Canceled) as e:
            running = self._stopped("canceled")
            during = f" during step {self.log.job_text(running)}" if running else ""
            why = str(e) if isinstance(e, Canceled) else "canceled by the user"
            self._fail(JobStatus.FAILED, FailureReason.CANCELED, f"{why}{during}")
        except PolicyDenied as e:
            self._fail(JobStatus.FAILED, FailureReason.SECRET_UNAVAILABLE,
                       f"secret unavailable: {e.diagnostics()}", e.diagnostics())
        except ImageProblem as e:
            status = JobStatus.FAILED if e.reason in (
                FailureReason.IMAGE_UNVERIFIED, FailureReason.IMAGE_VULNERABLE) \
                else JobStatus.ERROR
            note = e.message if e.message.startswith("image") else f"image: {e.message}"
            self._fail(status, e.reason, note, e.message)
        except StockadeError as e:
            self._stopped("error")
            self._fail(JobStatus.ERROR, FailureReason.SYSTEM_ERROR, f"error: {e.diagnostics()}",
                       e.diagnostics())
        except Exception as e:  # the job boundary: record it, never lose the job
            text = f"internal error: {type(e).__name__}: {e}"
            self._fail(JobStatus.ERROR, FailureReason.SYSTEM_ERROR, text, text)
        finally:
            try:
                self._teardown()
            except BaseException:
                self.log.close()  # whatever escapes, what the log holds is stored
                raise
        return self._finish()

    def refused(self, reason: FailureReason, note: str) -> Completion:
        """The attempt's end when the job's own input is refused before anything runs (a
        workspace archive the runner will not unpack): failed with ``reason``, saying why."""
        self._fail(JobStatus.FAILED, reason, note, note)
        return self._finish()

    def _stopped(self, status: str) -> str | None:
        """The step that was running when the job was stopped, recorded with ``status``."""
        if self._running is None:
            return None
        name, since = self._running
        self.steps.append(StepReport(name, status, None, time.monotonic() - since))
        self._running = None
        return name

    def _fail(self, status: JobStatus, reason: FailureReason, note: str,
              error: str | None = None) -> None:
        self.status, self.reason, self.exit_code = status, reason, None
        if error is not None:  # may quote what the job chose (a path, a name): cleaned
            self.details["error"] = "\n".join(self.log.job_text(line)
                                               for line in error.splitlines())
        for line in note.splitlines():  # a diagnostic and its hint: one note each
            self.log.note(line)

    def _prepare(self, workspace: WorkspaceSource | None) -> None:
        a, spec = self.a, self.spec
        self.log.note(f"job {spec.name} ({a.job_id}) attempt {a.attempt} on {self.runner_id}")
        self.secrets = JobSecrets(self.control, a, self.runner_id)
        self.log.use_masker(self.secrets.masker, self.secrets.mask_registered)
        rootfs = self._image() if spec.image != "host" else self._host_image()
        r = spec.resources
        self.sandbox = sandbox = self.backend.prepare(SandboxRequest(
            job_id=a.job_id, cpus=r.cpus, memory_bytes=r.memory, pids=r.pids, tmp_bytes=r.tmp,
            workspace_bytes=r.workspace, workspace_src=workspace,
            egress=spec.egress.mode != "none", identity=spec.id_token is not None,
            rootfs=rootfs))
        self.details["host_uid"] = sandbox.host_uid
        if sandbox.workspace_copy is not None:
            self.log.note(_workspace_note(sandbox.workspace_copy, self.log))
        if sandbox.egress_listener is not None:
            from stockade.runner.egress import EgressSession  # asyncio: only when needed

            self.egress = EgressSession(self.settings, spec, sandbox, self.log, self.control, a,
                                        clean=self.log.job_text)
        if sandbox.identity_token_path is not None:
            from stockade.runner.identity import TokenRefresher  # only jobs with an id_token

            self.identity = TokenRefresher(self.control, a, self.runner_id, sandbox,
                                           self.secrets.masker, self.settings.oidc_refresh_s)

    def _host_image(self) -> Path | None:
        """``image: host`` (no tree of its own: None), unless every image must be signed."""
        if not self.settings.require_signed_images:  # (the usual case: no import to pay for)
            return None
        from stockade.image.trust import host_verdict

        self._signature(host_verdict(self.settings))
        return None

    def _signature(self, verdict: Verdict) -> None:
        """Log and audit the image's signature verdict (image/trust.py); the job fails
        image_unverified if it refuses the image."""
        if verdict.event is not None:
            self.control.report(self.a.job_id, [verdict.event])
        if verdict.note is not None:
            self.log.note(verdict.note)
        if verdict.refusal is not None:
            raise ImageProblem(FailureReason.IMAGE_UNVERIFIED, verdict.refusal)

    def _image(self) -> Path:
        """The job's image, from the cache or pulled by digest into it: its tree."""
        from stockade.image.cache import ImageCache
        from stockade.image.errors import ImageUnavailable
        from stockade.image.reference import parse_reference

        ref = parse_reference(self.spec.image)
        if not ref.digest:  # admission pins every image: a tag here was not admitted by us
            raise ImageProblem(FailureReason.IMAGE_UNVERIFIED,
                               f"image {self.spec.image} is not pinned to a digest")
        started = time.monotonic()
        cache = ImageCache(self.settings.home / "images", self.settings.image_cache_bytes)
        signed = bool(self.settings.image_trusted_keys or self.settings.require_signed_images)
        # a signature to check is checked at every use: then the registry is asked anyway
        until = self.started + self.spec.timeout  # (another pull of it: waited for so long)
        try:
            image, pulled = None if signed else cache.cached(ref, until), False
            if image is None:
                image, pulled = self._pull(cache, ref, signed)
            # until teardown: not evicted meanwhile (if it was just now: pulled again, once)
            self._image_use = cache.use(image.digest, until)
            if self._image_use is None:
                image, pulled = self._pull(cache, ref, signed)
                self._image_use = cache.use(image.digest, until)
        except ImageUnavailable as e:
            raise ImageProblem(FailureReason.IMAGE_UNAVAILABLE, e.message) from None
        if self._image_use is None:
            raise ImageProblem(FailureReason.IMAGE_UNAVAILABLE,
                               f"image {image.reference} was evicted from the cache while "
                               "the job started (stockade image prune)")
        self.details["image"] = image.reference
        self.log.note(f"image {image.reference} ({'pulled' if pulled else 'cached'} in "
                      f"{time.monotonic() - started:.1f} s)")
        self._vulnerabilities(cache.root, image)
        return image.rootfs

    def _pull(self, cache: ImageCache, ref: ImageRef, signed: bool
              ) -> tuple[CachedImage, bool]:
        """The image, its signature checked first if ``signed``, from the cache or pulled,
        and whether it was pulled (the registry client is imported only here)."""
        from stockade.image.errors import ImageRefused
        from stockade.image.registry import Registry
        from stockade.image.settings import registry_config

        s = self.settings
        policy = None
        if signed:  # (else: no import to pay for)
            from stockade.image.trust import signature_verdict, trust_policy

            policy = trust_policy(s)  # (a bad setting is the operator's: system_error)
        # the pull counts against the job's own timeout
        left = self.started + self.spec.timeout - time.monotonic()
        registry = Registry(registry_config(s)).within(max(1.0, left))
        try:
            if policy is not None:
                self._signature(signature_verdict(policy, registry, ref))  # (its deadline too)
            return cache.pull(registry, ref)
        except ImageRefused as e:
            raise ImageProblem(FailureReason.IMAGE_UNVERIFIED, e.message) from None
        except StockadeError as e:
            raise ImageProblem(FailureReason.IMAGE_UNAVAILABLE, e.message) from None
        finally:
            registry.close()

    def _vulnerabilities(self, cache_root: Path, image: CachedImage) -> None:
        """The image's findings per severity on the job (with vulnerability_data set), and
        the job refused (image_vulnerable) at or above image_refuse_severity, before any
        step (image/scan.py)."""
        if not self.settings.vulnerability_data:  # not scanned: no import to pay for
            return
        from stockade.image.scan import check_image

        verdict = check_image(self.settings, cache_root, image)
        if verdict is not None:
            self.details["image_vulnerabilities"] = verdict.counts
            self.log.note(verdict.note)
            if verdict.refusal:
                raise ImageProblem(FailureReason.IMAGE_VULNERABLE, verdict.refusal)

    def _violated(self) -> bool:
        return self.egress is not None and self.egress.violated

    def _run_steps(self, sandbox: Sandbox, secrets: JobSecrets) -> None:
        spec, a = self.spec, self.a
        deadline = self.started + spec.timeout
        extra = {**secrets.env, **proxy_env(sandbox.proxy_url)}
        if sandbox.identity_token_path:
            extra["STOCKADE_ID_TOKEN_FILE"] = sandbox.identity_token_path
        for step in spec.steps:
            self._check_canceled()
            if self._violated():
                self.status, self.reason, self.exit_code = (
                    JobStatus.FAILED, FailureReason.EGRESS_VIOLATION, None)
                return
            left = deadline - time.monotonic()
            timeout = max(0.0, min(step.timeout or math.inf, left))
            self.log.note(f"step {step.name}")
            env = {**step_env(spec, a.job_id, a.attempt, step.name), **extra}
            self._running = (step.name, time.monotonic())
            exit = sandbox.run(StepRun(step.name, step.run, env, timeout, secrets.files),
                               self.log.output)
            self._check_canceled()
            self._running = None
            self.log.flush_partial()
            self.log.check_stored()
            step_status, reason = _classify(exit, self._violated())
            self.steps.append(StepReport(step.name, step_status, exit.exit_code,
                                         exit.duration_s))
            if reason is not None:
                job_limit = reason is FailureReason.TIMEOUT and timeout >= left - 0.001
                if exit.failed_at:  # the job's own text: cleaned like any job-chosen string
                    exit = exit._replace(failed_at=self.log.job_text(exit.failed_at))
                    self.details["failed_at"] = exit.failed_at
                self.log.note(_explain(step.name, exit, reason, timeout, spec, job_limit))
                if reason is FailureReason.TIMEOUT:
                    self.details["timeout"] = "job" if job_limit else "step"
                self.status, self.reason, self.exit_code = JobStatus.FAILED, reason, exit.exit_code
                return
            self.log.note(f"step {step.name} succeeded in {exit.duration_s:.2f}s")

    def _collect(self, sandbox: Sandbox, secrets: JobSecrets) -> None:
        sandbox.quiesce()  # nothing of the job may run while the runner reads its files
        self.details["memory_peak_bytes"] = sandbox.memory_peak()
        if not self.spec.artifacts:
            return
        from stockade.runner.artifacts import Caps, collect  # ctypes, openat2: when needed

        s = self.settings
        # collecting (and scanning for secrets) counts against the job's time, with a floor,
        # and never takes the runner (outside the job's cgroup) more than COLLECT_MAX_S
        now = time.monotonic()
        deadline = min(max(self.started + self.spec.timeout, now + COLLECT_FLOOR_S),
                       now + COLLECT_MAX_S)
        caps = Caps(s.artifact_max_file_bytes, s.artifact_max_total_bytes, s.artifact_max_files,
                    deadline=deadline)
        dest = s.artifacts_dir / self.a.job_id
        try:
            collected = collect(sandbox.workspace, self.spec.artifacts, dest, caps,
                                secrets.scan, secrets.names_in, self.log.job_text,
                                sandbox.host_uid)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            shutil.rmtree(dest, ignore_errors=True)  # a partial set is no use: free the space
            raise InfrastructureError(
                f"the artifacts could not be stored ({e.strerror}); none were kept",
                hint=f"free space on the file system of {s.artifacts_dir}") from e
        for path, names in collected.leaks:
            secrets.leaked(f"artifact {path}", names)
        if collected.leaks:
            self.status, self.reason = JobStatus.FAILED, FailureReason.SECRET_LEAK
            self.exit_code = None
        self.artifacts = collected.stored
        for problem in collected.refused:
            self.log.note(f"artifact refused: {problem}")
        if collected.refused:
            self.details["artifacts_refused"] = collected.refused

    def _teardown(self) -> None:
        if self.identity is not None:
            self.identity.close()
            for problem in self.identity.errors:
                self.log.note(f"id token refresh failed: {problem}")
        if self.egress is not None:
            self.records = self.egress.close()
        if self.sandbox is not None:
            leftovers = self.sandbox.teardown()
            if leftovers:
                self.details["leftovers"] = leftovers
                for item in leftovers:
                    self.log.note(f"TEARDOWN FAILED: {item}")
                self.status, self.reason = JobStatus.ERROR, FailureReason.SYSTEM_ERROR
        if self._image_use is not None:
            os.close(self._image_use)
            self._image_use = None

    def _finish(self) -> Completion:
        duration = time.monotonic() - self.started
        self._summary(duration)
        self.details["log_truncated"] = self.log.dropped > 0
        self.log.close()
        if self.log.disk_error is not None:
            self.details["log_truncated"] = True
            if self.status is not JobStatus.ERROR:
                self.status, self.reason = JobStatus.ERROR, FailureReason.SYSTEM_ERROR
                self.details["error"] = (f"the job log could not be stored "
                                         f"({self.log.disk_error.strerror}) and was cut")
        secrets = self.secrets
        if secrets is not None:
            in_log, _ = secrets.scan(self.log.path)
            if in_log:
                secrets.leaked("the stored log", sorted(in_log))
            if secrets.leaks:
                self.status, self.reason = JobStatus.FAILED, FailureReason.SECRET_LEAK
                self.exit_code = None  # the steps' exit codes do not say why it failed
                self.details["secret_leaks"] = [{"where": w, "secrets": n}
                                                for w, n in secrets.leaks]
            if secrets.reports:
                self.control.report(self.a.job_id, secrets.reports)
        a = self.a
        return Completion(a.job_id, a.attempt, self.runner_id, self.status, self.reason,
                          self.exit_code, tuple(self.steps), tuple(self.artifacts), duration,
                          self.details, self.records)

    def _summary(self, duration: float) -> None:
        outcome = self.status.value + (f" ({self.reason.value})" if self.reason else "")
        self.log.note(f"job {self.spec.name}: {outcome} in {duration:.2f}s, "
                      f"{len(self.steps)}/{len(self.spec.steps)} "
                      f"step{'' if len(self.spec.steps) == 1 else 's'} run, "
                      f"{len(self.artifacts)} artifact{'' if len(self.artifacts) == 1 else 's'}")
        for art in self.artifacts:
            self.log.note(f"artifact {art.path} {format_size(art.size)} "
                          f"sha256:{art.sha256[:16]}…")
        if self.artifacts:
            self.log.note(f"artifacts stored in {self.settings.artifacts_dir / self.a.job_id}")


def _workspace_note(copied: WorkspaceCopy, log: JobLog) -> str:
    files = f"{copied.files} file" + ("" if copied.files == 1 else "s")
    note = f"workspace: copied {files} ({format_size(copied.bytes)})"
    if not copied.excluded:
        return note + ", nothing excluded"
    more = ", ..." if copied.excluded > len(copied.excluded_paths) else ""
    paths = ", ".join(log.job_text(p) for p in copied.excluded_paths)
    return f"{note}, excluded {copied.excluded} ({paths}{more})"


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
             spec: Job, job_limit: bool) -> str:
    if reason is FailureReason.OOM:
        return (f"step {name} was killed: out of memory (limit "
                f"{format_size(spec.resources.memory)}, /tmp and /workspace count against it)")
    if reason is FailureReason.EGRESS_VIOLATION:
        return f"step {name} was killed: it tried to reach a destination the policy denies"
    if reason is FailureReason.TIMEOUT and job_limit:
        return (f"job timeout {spec.timeout:g}s reached during step {name}; all its processes "
                "were killed")
    if reason is FailureReason.TIMEOUT:
        return f"step {name} timed out after {timeout:g}s; all its processes were killed"
    where = f" at {exit.failed_at}" if exit.failed_at else ""
    return f"step {name} failed with exit code {exit.exit_code}{where}"
