"""The HTTP API of ``stockade server`` (FastAPI), over the same control-plane core as the CLI.

(No postponed annotations here: FastAPI reads the endpoints' annotations at run time.)

Versioned under ``/api/v1``, OpenAPI at ``/openapi.json``; ``/healthz`` says the process is up
and ``/readyz`` that the database answers at the newest schema. Every ``/api/v1`` request
carries an API token (``Authorization: Bearer stk_...``, see :mod:`.auth`); every refusal is
an audit event. Jobs submitted here are queued for runner agents (the fleet of issue 9; not
built yet), so today they wait.
"""

import time
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from stockade.api import auth
from stockade.audit import AuditEvent
from stockade.config import Settings
from stockade.control import ControlService
from stockade.errors import PolicyDenied, SpecError, UsageError
from stockade.store.interface import TokenRow

MAX_SPEC_BYTES = 256 * 1024
MAX_BODY_BYTES = 2 * MAX_SPEC_BYTES  # a JSON body: the spec, escaped, and a few fields


class SubmitRequest(BaseModel):
    """A job to queue: its spec as YAML text, the trust asked for (capped by the token's) and
    the source reference it runs."""

    model_config = {"extra": "forbid"}
    spec: str = Field(max_length=MAX_SPEC_BYTES)
    trust: Literal["untrusted", "trusted", "protected"] = "trusted"
    ref: str = Field(default="local", max_length=200)


class BodyLimit:
    """Refuse (413) a request body over ``limit`` bytes, declared or streamed, before anything
    reads it whole."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Pass the request on with its body counted."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await JSONResponse({"detail": f"the body is larger than {self.limit} bytes"},
                               413)(scope, receive, send)
            return
        seen = 0

        async def bounded() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"the body is larger than {self.limit} bytes")
            return message

        await self.app(scope, bounded, send)


def create_app(settings: Settings, control: ControlService) -> FastAPI:
    """The application; ``control`` is shared by all requests (its store serialises them)."""
    app = FastAPI(title="stockade", version="1", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    def refuse(request: Request, status: int, why: str, token_id: str | None) -> HTTPException:
        detail = {"path": request.url.path[:200], "reason": why}
        control.store.record([AuditEvent("api", "api.refused", time.time(), None,
                                         {**detail, "token": token_id} if token_id else detail)])
        return HTTPException(status, why, headers={"WWW-Authenticate": "Bearer"}
                             if status == 401 else None)

    def caller(needed: str) -> Any:
        def check(request: Request) -> TokenRow:
            header = request.headers.get("authorization", "")
            parts = auth.split(header.removeprefix("Bearer ").strip()) \
                if header.startswith("Bearer ") else None
            if parts is None:
                raise refuse(request, 401, "no valid bearer token", None)
            row = control.store.get_token(parts[0])
            why = auth.refusal(row, parts[1], time.time())
            if why is not None or row is None:
                raise refuse(request, 401, why or "unknown token", parts[0])
            if not auth.allows(row.role, needed):
                raise refuse(request, 403, f"the {row.role} role may not do this", row.id)
            return row
        return Depends(check)

    viewer, submitter = caller("viewer"), caller("submitter")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        try:
            control.store.list_jobs(1)
        except Exception as e:  # any database problem: not ready, say which
            return JSONResponse({"status": "unavailable", "reason": str(e)[:200]}, 503)
        return JSONResponse({"status": "ready"})

    @app.get("/api/v1/jobs")
    def list_jobs(token: Annotated[TokenRow, viewer],
                  limit: Annotated[int, Field(ge=1, le=1000)] = 20) -> list[dict[str, Any]]:
        return [{"job_id": j.id, "name": j.name, "status": j.status,
                 "failure_reason": j.failure_reason, "created_at": j.created_at}
                for j in control.jobs(limit)]

    @app.get("/api/v1/jobs/{job_id}")
    def get_job(job_id: str, token: Annotated[TokenRow, viewer]) -> dict[str, Any]:
        job = control.job(job_id) if job_id.isalnum() and len(job_id) <= 64 else None
        view = control.view(job.id) if job is not None else None
        if view is None:
            raise HTTPException(404, f"no job {job_id[:64]!r}")
        return view.result()

    @app.post("/api/v1/jobs", status_code=201)
    def submit(body: SubmitRequest, token: Annotated[TokenRow, submitter]) -> dict[str, Any]:
        from stockade.spec import ceilings
        from stockade.spec.parse import parse_spec

        try:
            spec = parse_spec(body.spec, source="the spec").to_job()
            ceilings.check(spec, settings, source="the spec")
            job = control.submit(spec, trust=auth.capped_trust(body.trust, token.max_trust),
                                 ref=body.ref, actor=f"api:{token.id}")
        except SpecError as e:
            raise HTTPException(422, e.diagnostics()) from e
        except (UsageError, PolicyDenied) as e:
            raise HTTPException(400, e.diagnostics()) from e
        return {"job_id": job.id, "status": job.status, "trust": job.trust,
                "failure_reason": job.failure_reason}

    return app
