"""The HTTP API of ``stockade server`` (FastAPI), over the same control-plane core as the CLI.

(No postponed annotations here: FastAPI reads the endpoints' annotations at run time.)

Versioned under ``/api/v1``, OpenAPI at ``/openapi.json``; ``/healthz`` says the process is up
and ``/readyz`` that the database answers. Every ``/api/v1`` request carries an API token
(``Authorization: Bearer stk_...``, see :mod:`.auth`), checked from the headers alone before
any body is read (:class:`Gate`); refusals are audit events, at most ``REFUSALS_PER_MINUTE``
of them a minute (the rest are counted into one event). Jobs submitted here are queued for
runner agents (the fleet of issue 9; not built yet), so today they wait.
"""

import json
import threading
import time
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
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
REFUSALS_PER_MINUTE = 60


class SubmitRequest(BaseModel):
    """A job to queue: its spec as YAML text, the trust asked for (capped by the token's) and
    the source reference it runs (one the token may speak for)."""

    model_config = {"extra": "forbid"}
    spec: str = Field(max_length=MAX_SPEC_BYTES)
    trust: Literal["untrusted", "trusted", "protected"] = "trusted"
    ref: str = Field(default="local", max_length=200)


class Refusals:
    """Audits refused requests, at most ``REFUSALS_PER_MINUTE`` a minute; the rest of a minute
    are counted into one ``api.refused_more`` event (unauthenticated clients cannot grow the
    trail without bound)."""

    def __init__(self, control: ControlService) -> None:
        self.control = control
        self._lock = threading.Lock()
        self._minute, self._recorded, self._more = 0, 0, 0

    def __call__(self, path: str, why: str, client: str, claimed: str | None) -> None:
        """Audit one refusal (or count it, past the minute's budget)."""
        minute = int(time.time() // 60)
        events = []
        with self._lock:
            if minute != self._minute:
                if self._more:
                    events.append(AuditEvent("api", "api.refused_more", time.time(), None,
                                             {"count": self._more}))
                self._minute, self._recorded, self._more = minute, 0, 0
            if self._recorded < REFUSALS_PER_MINUTE:
                self._recorded += 1
                detail = {"path": path[:200], "reason": why, "client": client}
                if claimed:  # what the request said, not who sent it
                    detail["claimed_token"] = claimed
                events.append(AuditEvent("api", "api.refused", time.time(), None, detail))
            else:
                self._more += 1
        if events:
            self.control.store.record(events)


class Gate:
    """Authenticates every ``/api/`` request from its headers before anything reads its body
    (GET needs a viewer, anything else a submitter), and refuses a body over ``limit`` bytes,
    declared or streamed. The caller's token is put in ``scope["state"]["token"]``."""

    def __init__(self, app: Any, control: ControlService, refusals: Refusals,
                 limit: int) -> None:
        self.app, self.control, self.refusals, self.limit = app, control, refusals, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Check, then pass the request on with its body counted."""
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        bearer = headers.get(b"authorization", b"").decode("latin-1")
        parts = auth.split(bearer[7:].strip()) if bearer.startswith("Bearer ") else None
        status, why, row = self._check(scope, headers, parts)
        if status:
            client = (scope.get("client") or ("?",))[0]
            self.refusals(scope["path"], why, str(client), parts[0] if parts else None)
            extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            await JSONResponse({"detail": why}, status, headers=extra)(scope, receive, send)
            return
        scope.setdefault("state", {})["token"] = row
        seen = 0

        async def bounded() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"the body is larger than {self.limit} bytes")
            return message

        await self.app(scope, bounded, send)

    def _check(self, scope: Any, headers: dict[bytes, bytes], parts: tuple[str, str] | None
               ) -> tuple[int, str, TokenRow | None]:
        if parts is None:
            return 401, "no valid bearer token", None
        row = self.control.store.get_token(parts[0])
        why = auth.refusal(row, parts[1], time.time())
        if why is not None or row is None:
            return 401, why or "unknown token", None
        needed = "viewer" if scope["method"] in ("GET", "HEAD") else "submitter"
        if not auth.allows(row.role, needed):
            return 403, f"the {row.role} role may not do this", None
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return 413, f"the body is larger than {self.limit} bytes", None
        return 0, "", row


def create_app(settings: Settings, control: ControlService) -> FastAPI:
    """The application; ``control`` is shared by all requests (its store serialises them)."""
    app = FastAPI(title="stockade", version="1", docs_url=None, redoc_url=None,
                  redirect_slashes=False)
    app.add_middleware(Gate, control=control, refusals=Refusals(control), limit=MAX_BODY_BYTES)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))[:100]}: "
                    f"{str(e.get('msg', ''))[:200]}" for e in exc.errors()[:10]]
        return JSONResponse({"detail": json.loads(json.dumps(problems, ensure_ascii=True))},
                            422)

    def token(request: Request) -> TokenRow:
        row: TokenRow = request.scope["state"]["token"]
        return row

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
    def list_jobs(limit: int = Query(20, ge=1, le=1000)) -> list[dict[str, Any]]:
        return [{"job_id": j.id, "name": j.name, "status": j.status,
                 "failure_reason": j.failure_reason, "created_at": j.created_at}
                for j in control.jobs(limit)]

    @app.get("/api/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        job = control.job(job_id) if job_id.isascii() and job_id.isalnum() \
            and len(job_id) <= 64 else None
        view = control.view(job.id) if job is not None else None
        if view is None:
            raise HTTPException(404, "no such job")
        return view.result()

    @app.post("/api/v1/jobs", status_code=201)
    def submit(body: SubmitRequest, request: Request) -> dict[str, Any]:
        from stockade.spec import ceilings
        from stockade.spec.parse import parse_spec

        caller = token(request)
        if not auth.ref_allowed(caller, body.ref):
            raise HTTPException(403, f"this token may submit jobs for refs matching "
                                     f"{caller.refs!r} only")
        try:
            spec = parse_spec(body.spec, source="the spec").to_job()
            ceilings.check(spec, settings, source="the spec")
            job = control.submit(spec, trust=auth.capped_trust(body.trust, caller.max_trust),
                                 ref=body.ref, actor=f"api:{caller.id}")
        except SpecError as e:
            raise HTTPException(422, e.diagnostics()) from e
        except (UsageError, PolicyDenied) as e:
            raise HTTPException(400, e.diagnostics()) from e
        return {"job_id": job.id, "status": job.status, "trust": job.trust,
                "failure_reason": job.failure_reason}

    return app
