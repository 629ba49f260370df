"""The routes of runner agents: enrolment and attestation (``/api/v1/enrol``), then, with a
session token, claims, heartbeats, log chunks, artifacts, secrets and completion
(``/api/v1/runner/``). Every write names its job and attempt; the store refuses writes of an
attempt that no longer holds its job (409), so a runner that lost its lease changes nothing.

(No postponed annotations here: FastAPI reads the endpoints' annotations at run time.)
"""

import base64
import json
import time

from fastapi import FastAPI, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from stockade.api.common import ApiContext, runner_of
from stockade.api.wire import (
    MAX_REPORT_DETAIL,
    REPORT_ACTIONS,
    AssignmentOut,
    AttestRequest,
    CompletedOut,
    CompletionIn,
    EnrolRequest,
    HeartbeatOut,
    RedeemIn,
    ReportIn,
    SessionOut,
)
from stockade.control.fleet import Caller, Session
from stockade.errors import PolicyDenied

LOG_CHUNK_MAX = 1024 * 1024
MAX_WAIT_S = 30.0
POLL_S = 0.25  # a waiting claim looks again this often (jobs queued through other replicas)
_JOB = r"^[A-Za-z0-9]{1,64}$"
_SHA = r"^[0-9a-f]{64}$"


def _session(s: Session) -> SessionOut:
    return SessionOut(**s._asdict())


def _json(model: BaseModel) -> Response:
    """``model`` as the answer, serialised once (FastAPI would validate it again first)."""
    return Response(model.model_dump_json(), media_type="application/json")


def add_routes(app: FastAPI, ctx: ApiContext) -> None:
    """Add the runner routes to ``app``."""
    fleet, control, waker, store_calls = ctx.fleet, ctx.control, ctx.waker, ctx.store_calls
    JobId = Path(pattern=_JOB)
    Attempt = Path(ge=1, le=1000)

    @app.post("/api/v1/enrol/nonce")
    def nonce() -> dict[str, str]:
        return {"nonce": fleet.nonce()}

    attestations = ctx.metrics.attestations

    @app.post("/api/v1/enrol")
    def enrol(body: EnrolRequest) -> SessionOut:
        try:
            session = fleet.enrol(body.token, body.nonce, body.public_key, body.name,
                                  body.labels, body.concurrency, body.measurements,
                                  body.signature)
        except PolicyDenied as e:
            attestations.labels("enrol", "refused").inc()
            raise HTTPException(403, e.message) from e
        attestations.labels("enrol", "passed").inc()
        return _session(session)

    @app.post("/api/v1/enrol/attest")
    def attest(body: AttestRequest) -> SessionOut:
        try:
            session = fleet.reattest(body.runner_id, body.nonce, body.measurements,
                                     body.signature)
        except PolicyDenied as e:
            attestations.labels("session", "refused").inc()
            raise HTTPException(403, e.message) from e
        attestations.labels("session", "passed").inc()
        return _session(session)

    @app.post("/api/v1/runner/claim", response_model=AssignmentOut,
              responses={204: {"description": "no job for now"}})
    async def claim(request: Request, wait: float = Query(0.0, ge=0, le=MAX_WAIT_S)
                    ) -> Response:
        caller = runner_of(request)
        deadline = time.monotonic() + wait
        while True:
            a = await store_calls(fleet.claim, caller)
            if a is not None:
                ctx.metrics.claims.inc()
                return _json(AssignmentOut.of(a))
            left = deadline - time.monotonic()
            if left <= 0 or await request.is_disconnected():
                return Response(status_code=204)
            await waker.wait(min(left, POLL_S))

    def held(caller: Caller, job_id: str, attempt: int) -> None:
        if not fleet.store.holds(job_id, attempt, caller.runner.id):
            raise HTTPException(409, "this attempt no longer holds the job")

    @app.post("/api/v1/runner/jobs/{job_id}/{attempt}/heartbeat", response_model=HeartbeatOut)
    async def heartbeat(request: Request, job_id: str = JobId, attempt: int = Attempt
                        ) -> Response:
        ok, cancel = await store_calls(fleet.heartbeat, runner_of(request), job_id, attempt)
        if not ok:
            raise HTTPException(409, "this attempt no longer holds the job")
        return _json(HeartbeatOut(held=True, cancel=cancel))

    @app.put("/api/v1/runner/jobs/{job_id}/{attempt}/log/{seq}", status_code=201)
    async def log_chunk(request: Request, job_id: str = JobId, attempt: int = Attempt,
                        seq: int = Path(ge=0, le=10**9)) -> dict[str, str]:
        caller = runner_of(request)
        data = await request.body()
        state = await store_calls(fleet.put_log, caller, job_id, attempt, seq, data)
        if state in ("fenced", "conflict"):
            raise HTTPException(409, f"chunk refused: {state}")
        if state == "full":
            raise HTTPException(413, "the job's log is full")
        return {"state": state}

    @app.put("/api/v1/runner/jobs/{job_id}/{attempt}/artifacts/{sha256}", status_code=201)
    async def artifact(request: Request, job_id: str = JobId, attempt: int = Attempt,
                       sha256: str = Path(pattern=_SHA)) -> dict[str, str]:
        caller = runner_of(request)
        data = await request.body()
        why = await run_in_threadpool(fleet.put_artifact, caller, job_id, attempt, sha256,
                                      data)
        if why == "fenced":
            raise HTTPException(409, "this attempt no longer holds the job")
        if why:
            raise HTTPException(422, why)
        return {"sha256": sha256}

    @app.get("/api/v1/runner/jobs/{job_id}/{attempt}/workspace")
    def workspace(request: Request, job_id: str = JobId, attempt: int = Attempt) -> Response:
        held(runner_of(request), job_id, attempt)
        job = control.job(job_id)
        data = fleet.store.get_blob(job.workspace_sha256) \
            if job is not None and job.workspace_sha256 else None
        if data is None:
            raise HTTPException(404, "this job has no workspace archive")
        return Response(data, media_type="application/x-tar")

    @app.post("/api/v1/runner/jobs/{job_id}/{attempt}/complete", response_model=CompletedOut)
    async def complete(body: CompletionIn, request: Request, job_id: str = JobId,
                       attempt: int = Attempt,
                       take_next: bool = Query(False, alias="next",
                                               description="also claim the runner's next job "
                                               "(without waiting) and return it as `next`")
                       ) -> Response:
        caller = runner_of(request)
        result = await store_calls(fleet.complete, caller,
                                   body.completion(job_id, attempt, caller.runner.id))
        if isinstance(result, str):
            raise HTTPException(422, result)
        a = None
        if not result:  # fenced, unless it is this completion again (its answer was lost)
            replayed, a = await store_calls(fleet.replayed, caller, job_id, attempt,
                                            body.status)
            if not replayed:
                raise HTTPException(409, "this attempt no longer holds the job")
        elif take_next and not await request.is_disconnected():
            a = await store_calls(fleet.claim, caller, (job_id, attempt))
            if a is not None:
                ctx.metrics.claims.inc()
        return _json(CompletedOut(recorded=True, next=AssignmentOut.of(a) if a else None))

    def secrets_allowed(caller: Caller, job_id: str, attempt: int) -> None:
        held(caller, job_id, attempt)
        if not fleet.may_use_secrets(caller):
            raise HTTPException(403, "this runner is not attested: no secrets or ID tokens")

    @app.post("/api/v1/runner/jobs/{job_id}/{attempt}/redeem")
    def redeem(body: RedeemIn, request: Request, job_id: str = JobId,
               attempt: int = Attempt) -> dict[str, str]:
        caller = runner_of(request)
        secrets_allowed(caller, job_id, attempt)
        try:
            value = control.redeem(body.lease_id, job_id, attempt, caller.runner.id)
        except PolicyDenied as e:
            raise HTTPException(403, e.message) from e
        return {"value": base64.b64encode(value).decode()}

    @app.post("/api/v1/runner/jobs/{job_id}/{attempt}/id-token")
    def id_token(request: Request, job_id: str = JobId, attempt: int = Attempt
                 ) -> dict[str, str]:
        caller = runner_of(request)
        secrets_allowed(caller, job_id, attempt)
        try:
            return {"token": control.mint_id_token(job_id, attempt, caller.runner.id)}
        except PolicyDenied as e:
            raise HTTPException(403, e.message) from e

    @app.post("/api/v1/runner/jobs/{job_id}/{attempt}/report", status_code=204)
    def report(body: ReportIn, request: Request, job_id: str = JobId,
               attempt: int = Attempt) -> Response:
        caller = runner_of(request)
        held(caller, job_id, attempt)
        if any(action not in REPORT_ACTIONS for action, _ in body.events):
            raise HTTPException(422, "a runner reports only these events: "
                                     f"{', '.join(sorted(REPORT_ACTIONS))}")
        if any(len(json.dumps(detail)) > MAX_REPORT_DETAIL for _, detail in body.events):
            raise HTTPException(413, f"an event's detail is over {MAX_REPORT_DETAIL} bytes")
        control.report(job_id, [(action, {**detail, "attempt": attempt})
                                for action, detail in body.events],
                       actor=f"runner:{caller.runner.id}")
        return Response(status_code=204)
