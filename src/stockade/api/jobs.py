"""The routes for people and their tools: jobs (submit, list, get, cancel, attempts,
provenance) and the workspace archives submitted jobs carry. Logs and artifacts are in
:mod:`.joblogs`, the administrator's routes in :mod:`.admin`.

Roles: a viewer reads, a submitter also submits and cancels the jobs it submitted, an admin
cancels any job. Path parameters are checked against their patterns before anything looks
them up; no error repeats what the request sent.

(No postponed annotations here: FastAPI reads the endpoints' annotations at run time.)
"""

import functools
import hashlib
import io
import re
from typing import Any, Literal

from fastapi import FastAPI, Header, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from stockade.api import auth
from stockade.api.common import ApiContext, needs, refuse, refuse_async, token_of
from stockade.config import Settings
from stockade.errors import PolicyDenied, SpecError, UsageError
from stockade.spec import Job
from stockade.store.interface import JobRow, TokenRow

MAX_SPEC_BYTES = 256 * 1024
INLINE_SPEC_CHARS = 4096  # a spec parsed on the event loop, at most: so many characters ...
INLINE_SPEC_NODES = 200  # ... and YAML values (building 200 takes about 1.5 ms)
MAX_UPLOAD_BYTES = 256 * 1024 * 1024  # a workspace archive, at most (held in memory)
JOB_PATTERN = r"^[A-Za-z0-9]{1,64}$"
SHA_PATTERN = r"^[0-9a-f]{64}$"
FINISHED = ("succeeded", "failed", "denied", "error")


def upload_limit(settings: Settings) -> int:
    """The largest workspace archive the server accepts."""
    return min(settings.max_workspace_bytes, MAX_UPLOAD_BYTES)


class SubmitRequest(BaseModel):
    """A job to queue: its spec as YAML text, the trust asked for (capped by the token's),
    the source reference it runs (one the token may speak for) and, optionally, the sha256 of
    a workspace archive uploaded before (``POST /api/v1/workspaces``)."""

    model_config = {"extra": "forbid"}
    spec: str = Field(max_length=MAX_SPEC_BYTES)
    trust: Literal["untrusted", "trusted", "protected"] = "trusted"
    ref: str = Field(default="local", max_length=200)
    workspace_sha256: str | None = Field(default=None, pattern=SHA_PATTERN)


async def submit_job(ctx: ApiContext, caller: TokenRow, body: SubmitRequest, scope: Any
                     ) -> dict[str, Any]:
    """Queue (or deny) the job ``body`` asks for in ``caller``'s name, for the request of
    ASGI ``scope`` (its route, and ``api/fastpath.py`` for a well-formed request). A valid
    spec of at most ``INLINE_SPEC_CHARS`` and ``INLINE_SPEC_NODES`` values that needs neither
    the store nor a registry to admit is parsed and admitted on the event loop (a few
    milliseconds at most, whatever the text); any other in a worker thread (each hop between
    threads costs more than a small spec's parsing). The job and its events are stored in one
    store call, on the store thread."""
    from stockade.spec import ceilings
    from stockade.spec.parse import parse_small

    control, fleet = ctx.control, ctx.fleet
    if not auth.ref_allowed(caller, body.ref):
        await refuse_async(ctx, scope, f"this token {auth.REFS_REFUSED} {caller.refs!r} only",
                           caller.id)
    if body.workspace_sha256 and await ctx.store_calls(
            fleet.store.has_blob, body.workspace_sha256) is None:
        raise HTTPException(422, "workspace_sha256 names no uploaded workspace archive: "
                                 "upload it first (POST /api/v1/workspaces)")
    try:
        small = parse_small(body.spec, INLINE_SPEC_NODES) \
            if len(body.spec) <= INLINE_SPEC_CHARS else None
        spec = small.to_job() if small is not None \
            else await run_in_threadpool(_parse, body.spec)
        ceilings.check(spec, ctx.settings, source="the spec")
        admit = functools.partial(
            control.admit, spec, trust=auth.capped_trust(body.trust, caller.max_trust),
            ref=body.ref, actor=f"api:{caller.id}", max_attempts=fleet.policy.max_attempts,
            workspace_sha256=body.workspace_sha256)
        admitted = admit() if control.admits_offline(spec) else await run_in_threadpool(admit)
    except SpecError as e:
        raise HTTPException(422, e.diagnostics()) from e
    except (UsageError, PolicyDenied) as e:
        raise HTTPException(400, e.diagnostics()) from e
    job = admitted.job
    await ctx.store_calls(control.store_admitted, admitted)
    if job.status == "queued":
        ctx.waker.notify()
    return {"job_id": job.id, "status": job.status, "trust": job.trust,
            "failure_reason": job.failure_reason}


def _parse(text: str) -> Job:
    from stockade.spec.parse import parse_spec

    return parse_spec(text, source="the spec").to_job()


def _job_id(job_id: str) -> str | None:
    return job_id if job_id.isascii() and job_id.isalnum() and len(job_id) <= 64 else None


def job_summary(j: JobRow) -> dict[str, Any]:
    """A job as ``GET /api/v1/jobs`` lists it (what ``stockade jobs --json`` prints)."""
    return {"job_id": j.id, "name": j.name, "status": j.status,
            "failure_reason": j.failure_reason, "created_at": j.created_at,
            "started_at": j.started_at, "finished_at": j.finished_at,
            "duration_s": round(j.finished_at - j.started_at, 3)
            if j.started_at is not None and j.finished_at is not None else None}


def _problem(text: str) -> str:
    """An archive refusal without the names it quotes (errors never repeat the request)."""
    return re.sub(r"octal \([^)]*\)", "octal", re.sub(r"'[^']*'", "'...'", text))[:300]


def add_routes(app: FastAPI, ctx: ApiContext) -> None:
    """Add the job routes to ``app``."""
    settings, control, fleet = ctx.settings, ctx.control, ctx.fleet
    JobId = Path(pattern=JOB_PATTERN)
    submitter = needs("submitter")

    @app.get("/api/v1/jobs")
    def list_jobs(limit: int = Query(20, ge=1, le=100_000),
                  prefix: str | None = Query(None, pattern=JOB_PATTERN)
                  ) -> list[dict[str, Any]]:
        if prefix is None:
            return [job_summary(j) for j in control.jobs(limit)]
        found = (control.job(i) for i in control.store.job_ids_with_prefix(prefix, limit))
        return [job_summary(j) for j in found if j is not None]

    @app.get("/api/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        job = control.job(job_id) if _job_id(job_id) else None
        view = control.view(job.id) if job is not None else None
        if view is None:
            raise HTTPException(404, "no such job")
        return view.result()

    @app.get("/api/v1/jobs/{job_id}/provenance")
    def provenance(job_id: str = JobId) -> dict[str, Any]:
        """The job's SLSA v1 provenance in a DSSE envelope (see ``stockade provenance``)."""
        from stockade.provenance.issue import ProvenanceUnavailable, issue
        from stockade.provenance.keys import signing_key

        view = control.view(job_id)
        if view is None or view.job.id != job_id:
            raise HTTPException(404, "no such job")
        try:
            return issue(view.job, view.artifacts, signing_key(control.store),
                         settings.oidc_issuer)
        except ProvenanceUnavailable as e:
            raise HTTPException(404, str(e)) from None

    @app.get("/api/v1/provenance/public-key")
    def provenance_key() -> dict[str, str]:
        """The public key that signs provenance (PEM) and its DSSE ``keyid``."""
        from stockade.provenance.keys import signing_key

        key = signing_key(control.store)
        return {"keyid": key.keyid, "public_key": key.public_pem()}

    @app.post("/api/v1/jobs", status_code=201)
    async def submit(body: SubmitRequest, request: Request) -> dict[str, Any]:
        return await submit_job(ctx, token_of(request), body, request.scope)

    @app.post("/api/v1/workspaces", status_code=201, dependencies=[submitter])
    async def upload(request: Request, sha256: str = Header(
            alias="X-Stockade-Sha256", pattern=SHA_PATTERN)) -> dict[str, Any]:
        data = await request.body()  # (the gate lets a few big bodies in at a time)
        return await run_in_threadpool(_keep_workspace, data, sha256)

    def _keep_workspace(data: bytes, sha256: str) -> dict[str, Any]:
        from stockade.sandbox.archive import ArchiveLimits, ArchiveRefused, check

        if hashlib.sha256(data).hexdigest() != sha256:
            raise HTTPException(422, "the archive's sha256 is not the one its header names")
        try:
            info = check(io.BytesIO(data), ArchiveLimits.for_workspace(
                settings.max_workspace_bytes))
        except ArchiveRefused as e:
            raise HTTPException(422, f"the workspace archive is refused: "
                                     f"{_problem(e.problem)}") from e
        fleet.store.put_blob(sha256, data, control.clock())
        return {"sha256": sha256, "size": info.size, "files": info.files,
                "bytes": info.bytes}

    @app.post("/api/v1/jobs/{job_id}/cancel", dependencies=[submitter])
    def cancel(request: Request, job_id: str = JobId) -> dict[str, str]:
        caller = token_of(request)
        job = control.job(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        if not auth.allows(caller.role, "admin") and submitter_of(job.id) != f"api:{caller.id}":
            refuse(request, "a submitter cancels only the jobs it submitted", caller.id)
        state = fleet.cancel(job.id, f"api:{caller.id}")
        if state is None:
            current = control.job(job.id)
            if current is not None and current.status in FINISHED:
                raise HTTPException(409, f"the job has finished ({current.status})")
            raise HTTPException(409, "a cancel was requested already")
        return {"job_id": job.id, "state": state}

    def submitter_of(job_id: str) -> str | None:
        for event in control.audit_trail(job_id):
            if event.action in ("job.admitted", "job.denied"):
                return event.actor
        return None

    @app.get("/api/v1/jobs/{job_id}/attempts")
    def attempts(job_id: str = JobId) -> list[dict[str, Any]]:
        if control.job(job_id) is None:
            raise HTTPException(404, "no such job")
        names = {r.id: r.name for r in fleet.store.runners()}
        return [{"attempt": a.attempt, "runner_id": a.runner_id,
                 "runner_name": names.get(a.runner_id), "started_at": a.started_at,
                 "ended_at": a.ended_at, "outcome": a.outcome, "log_bytes": a.log_bytes}
                for a in fleet.store.attempts(job_id)]
