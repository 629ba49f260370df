"""The routes for people and their tools: jobs (submit, list, get), ...

(No postponed annotations here: FastAPI reads the endpoints' annotations at run time.)
"""

from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from pydantic import BaseModel, Field

from stockade.api import auth
from stockade.api.common import ApiContext, token_of
from stockade.config import Settings
from stockade.errors import PolicyDenied, SpecError, UsageError

MAX_SPEC_BYTES = 256 * 1024
MAX_UPLOAD_BYTES = 256 * 1024 * 1024  # a workspace archive, at most (held in memory)


def upload_limit(settings: Settings) -> int:
    """The largest workspace archive the server accepts."""
    return min(settings.max_workspace_bytes, MAX_UPLOAD_BYTES)


class SubmitRequest(BaseModel):
    """A job to queue: its spec as YAML text, the trust asked for (capped by the token's) and
    the source reference it runs (one the token may speak for)."""

    model_config = {"extra": "forbid"}
    spec: str = Field(max_length=MAX_SPEC_BYTES)
    trust: Literal["untrusted", "trusted", "protected"] = "trusted"
    ref: str = Field(default="local", max_length=200)


def _job_id(job_id: str) -> str | None:
    return job_id if job_id.isascii() and job_id.isalnum() and len(job_id) <= 64 else None


def add_routes(app: FastAPI, ctx: ApiContext) -> None:
    """Add the job routes to ``app``."""
    settings, control = ctx.settings, ctx.control

    @app.get("/api/v1/jobs")
    def list_jobs(limit: int = Query(20, ge=1, le=1000)) -> list[dict[str, Any]]:
        return [{"job_id": j.id, "name": j.name, "status": j.status,
                 "failure_reason": j.failure_reason, "created_at": j.created_at}
                for j in control.jobs(limit)]

    @app.get("/api/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        job = control.job(job_id) if _job_id(job_id) else None
        view = control.view(job.id) if job is not None else None
        if view is None:
            raise HTTPException(404, "no such job")
        return view.result()

    @app.post("/api/v1/jobs", status_code=201)
    def submit(body: SubmitRequest, request: Request) -> dict[str, Any]:
        from stockade.spec import ceilings
        from stockade.spec.parse import parse_spec

        caller = token_of(request)
        if not auth.ref_allowed(caller, body.ref):
            raise HTTPException(403, f"this token may submit jobs for refs matching "
                                     f"{caller.refs!r} only")
        try:
            spec = parse_spec(body.spec, source="the spec").to_job()
            ceilings.check(spec, settings, source="the spec")
            job = control.submit(spec, trust=auth.capped_trust(body.trust, caller.max_trust),
                                 ref=body.ref, actor=f"api:{caller.id}",
                                 max_attempts=ctx.fleet.policy.max_attempts)
        except SpecError as e:
            raise HTTPException(422, e.diagnostics()) from e
        except (UsageError, PolicyDenied) as e:
            raise HTTPException(400, e.diagnostics()) from e
        if job.status == "queued":
            ctx.waker.notify()
        return {"job_id": job.id, "status": job.status, "trust": job.trust,
                "failure_reason": job.failure_reason}
